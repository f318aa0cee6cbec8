"""Padding rules in batches of samples of unequal lengths: every "last token" is the sample's own.

Batches of 5 over 4 images x (normal, noisy, empty) prompts: each batch mixes three prompt kinds
(so three lengths), and the last batch is a partial one (12 = 5 + 5 + 2). Every attention mode's
query rows, weights and norm-based attention are checked against the model's own unbatched forward.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.analyze.test_norm_attention import brute_force
from tests.helpers import load_reference, run_reference
from vislens.analyze.norm_attention import norm_attention_per_sample
from vislens.extract import ExtractConfig, extract
from vislens.store import DONE, IMAGE, TEXT, open_store

BATCH = 5


@pytest.fixture(scope="module")
def stores(toy_models, manifest, tmp_path_factory):
    """One store per attention mode: 12 samples of the GQA toy in batches of 5."""
    root = tmp_path_factory.mktemp("padding")
    out = {}
    for mode in ("last", "all", "text"):
        path = str(root / f"{mode}.zarr")
        config = ExtractConfig(
            model=str(toy_models["gqa"]),
            data=str(manifest),
            out=path,
            limit=4,
            prompts=("normal", "noisy", "empty"),
            batch_size=BATCH,
            attention=mode,
            progress=False,
        )
        assert extract(config).written == 12
        out[mode] = path
    return out


@pytest.fixture(scope="module")
def own(stores, toy_models, manifest):
    """Per sample: (inputs, outputs) of the model's own unbatched forward, with attention weights."""
    model, processor = load_reference(toy_models["gqa"])
    acts = open_store(stores["last"])["activations"].to_dataset()
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    out = []
    for s in range(acts.sizes["sample"]):
        image = str(manifest.parent / records[int(acts.image_index[s])]["image"])
        out.append(run_reference(model, processor, image, str(acts.prompt_text[s].values), output_attentions=True))
    return model, out


def _expected_rows(mode: str, modality: np.ndarray, n: int) -> np.ndarray:
    if mode == "last":
        return np.array([n - 1])
    if mode == "all":
        return np.arange(n)
    return np.flatnonzero(modality[:n] == TEXT)


def test_the_batches_mix_lengths(stores):
    acts = open_store(stores["last"])["activations"].to_dataset()
    n = acts.n_tokens.values
    batches = [n[i : i + BATCH] for i in range(0, len(n), BATCH)]
    assert all(len(set(b)) >= 2 for b in batches) and len(batches[-1]) < BATCH
    assert (acts.done.values == DONE).all()
    hidden = acts.hidden.values
    for s, length in enumerate(n):  # docs/store-format.md: padding positions of hidden hold 0
        assert (hidden[s, :, length:] == 0).all() and np.isfinite(hidden[s, :, :length]).all()


@pytest.mark.parametrize("mode", ["last", "all", "text"])
def test_query_rows_and_weights_are_each_samples_own(stores, own, mode):
    model, outputs = own
    tree = open_store(stores[mode])
    acts = tree["activations"].to_dataset().load()
    attention = tree["attention"].to_dataset().load()
    for s, (inputs, out) in enumerate(outputs):
        n = int(acts.n_tokens[s])
        assert n == inputs["input_ids"].shape[1]
        rows = _expected_rows(mode, acts.modality[s].values, n)
        stored_rows = attention.query_pos[s].values
        np.testing.assert_array_equal(stored_rows[: len(rows)], rows, err_msg=f"sample {s}")
        assert (stored_rows[len(rows) :] == -1).all()
        weights = torch.stack(out.attentions)[:, 0]  # (layer, head, N, N)
        got = attention.attn[s].values[:, :, : len(rows)].astype(np.float32)  # (layer, head, q, token)
        np.testing.assert_allclose(got[..., :n], weights[:, :, rows].numpy(), rtol=2e-3, atol=2e-3)
        assert (got[..., n:] == 0).all()
        np.testing.assert_allclose(got[..., :n].sum(-1), 1.0, atol=5e-3)  # real rows, never a pad's


@pytest.mark.parametrize("mode", ["last", "all", "text"])
def test_norm_attention_uses_each_samples_last_token_and_text_queries(stores, own, mode):
    """``last_query`` is the row of the sample's own last token; ``image_share`` (and its share after
    the image) averages text query rows only, whatever rows the store holds (``all`` holds image rows too)."""
    model, outputs = own
    tree = open_store(stores[mode])
    per = norm_attention_per_sample(tree).compute()
    acts = tree["activations"].to_dataset()
    for s in (0, 1, 2, 3, 10, 11):  # three lengths in the first batch, two in the partial last one
        inputs, _ = outputs[s]
        na = brute_force(model, inputs)  # (layer, query, key)
        n = na.shape[1]
        np.testing.assert_allclose(per["last_query"][s, :, :n].values, na[:, n - 1], rtol=5e-3, atol=1e-5)
        assert (per["last_query"][s, :, n:].values == 0).all()
        if mode == "last":
            continue
        image = acts.modality[s, :n].values == IMAGE
        text_q = np.flatnonzero(~image)
        shares = na[:, text_q][:, :, image].sum(-1) / na[:, text_q].sum(-1)
        np.testing.assert_allclose(per["image_share"][s].values, shares.mean(-1), rtol=5e-3)
        after = text_q > np.argmax(image)  # text queries that can see the image
        np.testing.assert_allclose(per["image_share_after_image"][s].values, shares[:, after].mean(-1), rtol=5e-3)
