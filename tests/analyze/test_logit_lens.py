"""Logit lens equals the model's own lm_head(norm(h)); caching; Dask equals serial."""

from __future__ import annotations

import json
from pathlib import Path

import dask
import numpy as np
import pytest
import torch
from distributed import get_task_stream

from tests.helpers import assert_top1_matches, decoder_of, hidden_of, load_reference, run_reference
from vislens.analyze.logit_lens import CACHE_NAME, cached_topk, logit_lens, logit_lens_per_sample, logit_lens_topk
from vislens.store import open_store


@pytest.mark.parametrize("arch", ["mha", "gqa"])
def test_top1_equals_argmax_of_the_models_own_lm_head(analysis_stores, toy_models, manifest, arch):
    """Two references: the model's own norm and lm_head applied (a) to the stored fp16 states,
    where every position must agree, and (b) to the model's own fp32 states, where every position
    whose top-2 margin exceeds what fp16 rounding of h can move must agree."""
    tree = open_store(analysis_stores[arch])
    top = logit_lens_topk(tree, k=1).compute()
    acts = tree["activations"].to_dataset()
    model, processor = load_reference(toy_models[arch])
    records = [json.loads(line) for line in Path(manifest).read_text().splitlines()]
    norm, head = decoder_of(model).norm, model.get_output_embeddings()
    compared = total = 0
    for s in range(acts.sizes["sample"]):
        record = records[int(acts.image_index[s])]
        inputs, outputs = run_reference(
            model, processor, str(manifest.parent / record["image"]), str(acts.prompt_text[s].values)
        )
        image = (inputs["input_ids"][0] == model.config.image_token_id).numpy()
        padded = np.zeros(top.sizes["token"], dtype=bool)
        padded[: image.size] = image
        ours = torch.from_numpy(top[s].values[:, padded, 0].astype(np.int64))
        stored = torch.from_numpy(acts.hidden[s].values[:, padded].astype(np.float32))
        states = torch.from_numpy(hidden_of(outputs)[:, image])
        done = assert_top1_matches(ours, stored, states, norm, head)
        compared, total = compared + done[0], total + done[1]
        assert (top[s].values[:, ~padded] == -1).all()
    assert compared / total > 0.5


def test_cache_is_written_reused_and_rescored(analysis_stores, tmp_path):
    import shutil

    path = tmp_path / "s.zarr"
    shutil.copytree(analysis_stores["gqa"], path)
    tree = open_store(str(path))
    assert "results" not in tree.children or CACHE_NAME not in tree["results"].children
    first = logit_lens(tree, top_k=3)
    reopened = open_store(str(path))
    cached = reopened["results"][CACHE_NAME][CACHE_NAME]  # results/<name> holds the array and its coordinates
    assert cached.sizes["rank"] == 3 and cached.attrs["k"] == 3
    assert cached.attrs["source_fingerprint"] == reopened.attrs["vislens_fingerprint"]
    # reusing the cache gives the same numbers; top-1 is scored from the cached top-3
    again = logit_lens(reopened, top_k=3)
    np.testing.assert_array_equal(first["precision"].values, again["precision"].values)
    top1_cached = cached_topk(reopened, 1)
    np.testing.assert_array_equal(top1_cached.values, logit_lens_topk(reopened, 1).compute().values)
    # widening the top-k decodes more words: recall can only grow
    one = logit_lens(reopened, top_k=1)
    assert (again["recall"].values >= one["recall"].values - 1e-12).all()


def test_dask_cluster_equals_serial(analysis_stores, dask_cluster):
    tree = open_store(analysis_stores["mha"])
    with dask.config.set(scheduler=dask_cluster), get_task_stream(dask_cluster) as stream:
        on_cluster = logit_lens_per_sample(tree, top_k=2, cache=False)
    assert len(stream.data) > 0  # the workers did the work
    with dask.config.set(scheduler="synchronous"):
        serial = logit_lens_per_sample(tree, top_k=2, cache=False)
    np.testing.assert_array_equal(on_cluster["precision"].values, serial["precision"].values)
    np.testing.assert_array_equal(on_cluster["recall"].values, serial["recall"].values)


def test_means_per_prompt_kind(analysis_stores):
    tree = open_store(analysis_stores["gqa"])
    per_sample = logit_lens_per_sample(tree, cache=False)
    means = logit_lens(tree, cache=False)
    assert sorted(means["prompt_kind"].values) == ["empty", "noisy", "normal"]
    for kind in ("normal", "noisy", "empty"):
        rows = per_sample.where(per_sample.prompt_kind == kind, drop=True)
        np.testing.assert_allclose(means.sel(prompt_kind=kind)["recall"].values, rows["recall"].mean("sample").values)
        assert int(means.sel(prompt_kind=kind)["n_samples"]) == 6


@pytest.mark.parametrize("arch", ["mha", "gqa", "rms_offset", "layer"])
def test_scores_equal_an_independent_recount(analysis_stores, toy_models, norm_kind_cases, arch):
    """precision, token_precision and recall recomputed from scratch: the model's own final norm and
    lm_head on the stored states (the last layer as is), each image token's top-1 id decoded alone
    with the model's tokenizer, against the captions' words (docs/methods.md, analysis 1). Both toy
    LLaVAs (RMSNorm), and a Gemma-3 (``rms_offset``) and a LayerNorm-with-bias decoder."""
    import re

    from vislens.analyze.words import stop_words

    store, checkpoint = norm_kind_cases[arch] if arch in norm_kind_cases else (analysis_stores[arch], toy_models[arch])
    tree = open_store(store)
    ours = logit_lens_per_sample(tree, cache=False)
    acts = tree["activations"].to_dataset()
    caps = tree["captions"].to_dataset()
    model, processor = load_reference(checkpoint)
    tok = processor.tokenizer
    norm, head = decoder_of(model).norm, model.get_output_embeddings()
    stop, special = stop_words(), set(tok.all_special_ids)

    def word(token_id: int) -> str | None:
        text = "".join(re.findall(r"[^\W_]+", tok.decode([token_id]).strip().lower()))
        return None if token_id in special or not text or text in stop else text

    last = acts.sizes["layer"] - 1
    for s in range(acts.sizes["sample"]):
        i = int(acts.image_index[s])
        captions = [str(c) for c in caps.text[i, : int(caps.n_captions[i])].values]
        reference = {w for c in captions for w in re.findall(r"[^\W_]+", c.lower()) if w not in stop}
        image = acts.modality[s].values == 1
        states = torch.from_numpy(acts.hidden[s].values[:, image].astype(np.float32))
        with torch.no_grad():
            for layer in range(acts.sizes["layer"]):
                h = states[layer] if layer == last else norm(states[layer])
                words = [word(int(t)) for t in head(h).argmax(-1)]
                decoded = {w for w in words if w}
                hits = decoded & reference
                expected = [
                    len(hits) / len(decoded) if decoded else 0.0,
                    sum(w in reference for w in words if w) / max(1, sum(1 for w in words if w)),
                    len(hits) / len(reference),
                ]
                got = [float(ours[name][s, layer]) for name in ("precision", "token_precision", "recall")]
                np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=f"sample {s} layer {layer}")


NORM_KINDS = ("rms", "rms_offset", "layer")


@pytest.mark.parametrize("kind", NORM_KINDS)
def test_every_norm_kind_gives_the_models_own_top_k(norm_kind_cases, kind):
    """For each final-norm kind (RMSNorm, Gemma's RMSNorm with (1 + w), LayerNorm with a non-zero
    bias), the lens's top-3 ids at every image token and layer are those of the model's own
    ``lm_head(norm(h))`` on the stored states (the last layer, already final-normed, as is), the
    norm being the model's own module, loaded directly with transformers. Wherever the model's
    top-4 logits are separated by more than 1e-4 the ids must agree, and such positions must be
    most of them; dropping the bias, the offset or the norm's weight changes most ids."""
    from transformers import AutoModelForImageTextToText

    store, checkpoint = norm_kind_cases[kind]
    tree = open_store(store)
    lens = tree["lens"].to_dataset()
    assert str(lens.attrs["norm_kind"]) == kind
    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    norm, head = decoder_of(model).norm, model.get_output_embeddings()
    if kind == "layer":
        assert isinstance(norm, torch.nn.LayerNorm) and norm.bias.abs().mean() > 0.5
        np.testing.assert_array_equal(lens["norm_bias"].values, norm.bias.detach().numpy())
    else:
        assert "norm_bias" not in lens and (norm.weight - (0 if kind == "rms_offset" else 1)).abs().min() > 0
    acts = tree["activations"].to_dataset()
    assert int(acts["layer"].attrs["final_norm_applied_to_last"]) == 1
    top = logit_lens_topk(tree, k=3).compute()
    last = acts.sizes["layer"] - 1
    compared = total = 0
    with torch.no_grad():
        for s in range(acts.sizes["sample"]):
            image = acts.modality[s].values == 1
            assert image.any() and (top[s].values[:, ~image] == -1).all()
            stored = torch.from_numpy(acts.hidden[s].values[:, image].astype(np.float32))
            for layer in range(last + 1):
                logits = head(stored[layer] if layer == last else norm(stored[layer]))
                best = logits.topk(4, dim=-1)
                clear = (best.values[:, :3] - best.values[:, 1:]).min(-1).values > 1e-4
                ours = torch.from_numpy(top[s].values[layer][image].astype(np.int64))
                assert torch.equal(ours[clear], best.indices[clear, :3]), (kind, s, layer)
                compared, total = compared + int(clear.sum()), total + int(clear.numel())
    assert compared / total > 0.9, (compared, total)


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_top_k_equals_one_plain_topk_over_the_vocabulary(analysis_stores, backend):
    """The lens kernel (the exact CPU path, and the torch backend's vocabulary tiles) gives the
    logits of one plain fp32 ``(norm(h) @ W.T).topk`` over the whole vocabulary."""
    from vislens.analyze.logit_lens import _lens_arrays, apply_norm

    tree = open_store(analysis_stores["gqa"])
    lens = _lens_arrays(tree)
    blocked = logit_lens_topk(tree, k=3, backend=backend).compute()
    acts = tree["activations"].to_dataset()
    weight = torch.from_numpy(lens["unembedding"]).float()
    last = acts.sizes["layer"] - 1
    for s in range(0, acts.sizes["sample"], 5):
        image = acts.modality[s].values == 1
        h = torch.from_numpy(acts.hidden[s].values[:, image].astype(np.float32))
        normed = apply_norm(h[:last], lens["norm_kind"], lens["norm_eps"], torch.from_numpy(lens["norm_weight"]), None)
        logits = torch.cat([normed, h[last:]]) @ weight.T
        expected = logits.topk(3, dim=-1)
        ours = torch.from_numpy(blocked[s].values[:, image].astype(np.int64))
        got_values = logits.gather(-1, ours)
        torch.testing.assert_close(got_values, expected.values, rtol=0, atol=1e-5)  # same logits (ties may swap ids)


def test_a_cache_from_before_a_resume_is_not_reused(analysis_stores, tmp_path):
    """The cache written while some samples were pending must be recomputed once they are done."""
    import shutil

    import zarr

    from vislens.store import DONE, PENDING

    path = tmp_path / "s.zarr"
    shutil.copytree(analysis_stores["mha"], path)
    done = zarr.open_array(str(path / "activations" / "done"), mode="r+")
    done[10:] = PENDING  # as if the extraction had been interrupted
    partial = cached_topk(open_store(str(path)), 1)
    assert partial.sizes["sample"] == 10
    done[10:] = DONE  # the resumed extraction finished them
    resumed = open_store(str(path))
    top = cached_topk(resumed, 1)
    assert list(top["sample"].values) == list(range(resumed["activations"].sizes["sample"]))
    np.testing.assert_array_equal(top.values, logit_lens_topk(resumed, 1).compute().values)
