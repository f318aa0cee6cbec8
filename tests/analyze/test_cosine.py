"""Cosine similarity equals a brute-force all-pairs mean over the model's own hidden states."""

from __future__ import annotations

import json
from pathlib import Path

import dask
import numpy as np
import pytest
import torch
from distributed import get_task_stream

from tests.helpers import hidden_of, instruction_positions, load_reference, run_reference
from vislens.analyze import cosine, cosine_per_sample, cosine_table
from vislens.store import open_store
from vislens.store.schema import ROLE_BOS, ROLE_IMAGE, ROLE_INSTRUCTION, ROLE_TEMPLATE


def brute_force(a: np.ndarray, b: np.ndarray, same: bool = False) -> float:
    """Mean over all pairs (i != j when same) of cos(a_i, b_j), written plainly."""
    a = torch.from_numpy(a).double()
    b = torch.from_numpy(b).double()
    sims = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T
    if same:
        sims = sims[~torch.eye(len(a), dtype=torch.bool)]
    return float(sims.mean())


@pytest.mark.parametrize("arch", ["mha", "gqa"])
def test_cosine_equals_brute_force_on_the_models_own_states(analysis_stores, toy_models, manifest, arch):
    """Instruction-only (the default) and all-text cosine against a brute-force all-pairs mean over the
    model's own fp32 states, with the instruction tokens located independently (tests.helpers)."""
    tree = open_store(analysis_stores[arch])
    ours = {
        "instruction": cosine_per_sample(tree).compute(),
        "all": cosine_per_sample(tree, text_tokens="all").compute(),
    }
    acts = tree["activations"].to_dataset()
    model, processor = load_reference(toy_models[arch])
    records = [json.loads(line) for line in Path(manifest).read_text().splitlines()]
    checked = 0
    for s in range(acts.sizes["sample"]):
        record = records[int(acts.image_index[s])]
        prompt = str(acts.prompt_text[s].values)
        inputs, outputs = run_reference(model, processor, str(manifest.parent / record["image"]), prompt)
        hidden = hidden_of(outputs)
        image = (inputs["input_ids"][0] == model.config.image_token_id).numpy()
        instruction = np.zeros_like(image)
        instruction[instruction_positions(processor, prompt, inputs["input_ids"][0], model.config.image_token_id)] = (
            True
        )
        assert not instruction[0]  # BOS is never an instruction token
        roles = acts.token_role[s, : image.size].values
        np.testing.assert_array_equal(roles == ROLE_INSTRUCTION, instruction, err_msg=f"sample {s}: {prompt!r}")
        np.testing.assert_array_equal(roles == ROLE_IMAGE, image)
        assert roles[0] == ROLE_BOS and (roles[~image & ~instruction][1:] == ROLE_TEMPLATE).all()
        for text_tokens, text in (("instruction", instruction), ("all", ~image)):
            for layer in range(hidden.shape[0]):
                h = hidden[layer]
                got = [
                    float(ours[text_tokens][name][s, layer]) for name in ("inter_modal", "intra_image", "intra_text")
                ]
                if not text.any():  # the empty prompt has no instruction: NaN, never a mean over other tokens
                    assert np.isnan(got[0]) and np.isnan(got[2])
                    continue
                expected = [
                    brute_force(h[image], h[text]),
                    brute_force(h[image], h[image], True),
                    brute_force(h[text], h[text], True) if text.sum() > 1 else np.nan,
                ]
                np.testing.assert_allclose(got, expected, atol=2e-3, err_msg=f"{text_tokens} sample {s} layer {layer}")
                checked += 1
    assert checked > acts.sizes["sample"] * hidden.shape[0]  # both readings, most samples


def test_instruction_and_all_text_differ(analysis_stores):
    """The two text sets give different numbers (BOS and template tokens are left out by default)."""
    tree = open_store(analysis_stores["gqa"])
    normal = cosine(tree).sel(prompt_kind="normal")
    everything = cosine(tree, text_tokens="all").sel(prompt_kind="normal")
    assert np.abs(normal["inter_modal"] - everything["inter_modal"]).max() > 1e-3
    assert int(cosine(tree).sel(prompt_kind="empty")["n_text_samples"]) == 0
    assert np.isnan(cosine(tree).sel(prompt_kind="empty")["inter_modal"]).all()


def test_means_per_prompt_kind_and_table(analysis_stores):
    tree = open_store(analysis_stores["gqa"])
    per_sample = cosine_per_sample(tree).compute()
    means = cosine(tree)
    for kind in ("normal", "noisy", "empty"):
        rows = per_sample.where(per_sample.prompt_kind == kind, drop=True)
        np.testing.assert_allclose(
            means.sel(prompt_kind=kind)["inter_modal"], rows["inter_modal"].mean("sample"), rtol=1e-6
        )
    table = cosine_table([analysis_stores["mha"], analysis_stores["gqa"]])
    assert list(table.columns[:5]) == ["store", "model", "series", "prompt_kind", "layer"]
    assert len(table) == 2 * 3 * tree["activations"].sizes["layer"]
    assert (table["text_tokens"] == "instruction").all()
    assert (table[table.prompt_kind == "normal"]["n_text_samples"] == 6).all()


def test_dask_cluster_equals_serial(analysis_stores, dask_cluster):
    tree = open_store(analysis_stores["mha"])
    with dask.config.set(scheduler=dask_cluster), get_task_stream(dask_cluster) as stream:
        on_cluster = cosine_per_sample(tree).compute()
    assert len(stream.data) > 0  # the workers did the work
    with dask.config.set(scheduler="synchronous"):
        serial = cosine_per_sample(tree).compute()
    np.testing.assert_array_equal(on_cluster["inter_modal"].values, serial["inter_modal"].values)


def test_results_per_prompt(analysis_stores):
    """--by prompt: one row per (kind, prompt id), the mean of exactly that prompt's samples."""
    tree = open_store(analysis_stores["gqa"])
    per_sample = cosine_per_sample(tree).compute()
    by_prompt = cosine(tree, by="prompt")
    ids = per_sample["prompt_id"].values.astype(str)
    kinds = per_sample["prompt_kind"].values.astype(str)
    assert by_prompt.sizes["prompt"] == len(set(zip(kinds, ids)))
    for key in by_prompt["prompt"].values:
        kind, pid = str(key).split(":", 1)
        rows = (kinds == kind) & (ids == pid)
        row = by_prompt.sel(prompt=key)
        assert str(row["prompt_kind"].values) == kind and str(row["prompt_id"].values) == pid
        assert int(row["n_samples"]) == rows.sum()
        np.testing.assert_allclose(row["intra_image"].values, per_sample["intra_image"].values[rows].mean(0), rtol=1e-6)
    table = cosine_table([analysis_stores["gqa"]], by="prompt")
    assert {"prompt_id", "prompt_text"} <= set(table.columns)
