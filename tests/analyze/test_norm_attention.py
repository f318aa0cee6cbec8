"""Norm-based attention from the store equals a brute-force computation on the model itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import decoder_of, lm_outputs, load_reference, run_reference
from vislens.analyze.norm_attention import (
    last_query_heatmap,
    norm_attention,
    norm_attention_per_sample,
    pick_samples,
    top_image_tokens,
)
from vislens.store import open_store


def brute_force(model, inputs):
    """Per layer: NA(q, j) = |sum_h alpha^h_qj f_h(x_j)| for all q, j, materialised literally."""
    values = {}
    layers = decoder_of(model).layers
    hooks = [
        layer.self_attn.v_proj.register_forward_hook(lambda m, i, o, k=k: values.__setitem__(k, o[0]))
        for k, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
    finally:
        for hook in hooks:
            hook.remove()
    cfg = model.config.text_config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // heads
    result = []
    with torch.no_grad():
        for k, layer in enumerate(layers):
            alpha = lm_outputs(out).attentions[k][0]  # (H, N, N)
            w_o = layer.self_attn.o_proj.weight  # (D, H d)
            kv_of = [h // (heads // kv) for h in range(heads)]
            f = torch.stack(
                [values[k][:, g * d : (g + 1) * d] @ w_o[:, h * d : (h + 1) * d].T for h, g in enumerate(kv_of)]
            )  # (H, N, D)
            moved = alpha[:, :, :, None] * f[:, None, :, :]  # (H, Nq, Nj, D)
            result.append(moved.sum(0).norm(dim=-1))  # (Nq, Nj)
    return torch.stack(result).numpy()  # (L, N, N)


@pytest.mark.parametrize("arch", ["mha", "gqa"])
def test_store_norm_attention_equals_brute_force(analysis_stores, toy_models, manifest, arch):
    tree = open_store(analysis_stores[arch])
    per = norm_attention_per_sample(tree).compute()
    acts = tree["activations"].to_dataset()
    model, processor = load_reference(toy_models[arch])
    records = [json.loads(line) for line in Path(manifest).read_text().splitlines()]
    for s in [0, 1, 2, 9, 17]:  # normal, noisy, empty prompts of several images
        record = records[int(acts.image_index[s])]
        image_path = str(manifest.parent / record["image"])
        inputs, _ = run_reference(model, processor, image_path, str(acts.prompt_text[s].values))
        na = brute_force(model, inputs)
        ids = inputs["input_ids"][0].numpy()
        image = ids == model.config.image_token_id
        n = len(ids)
        np.testing.assert_allclose(per["last_query"][s, :, :n].values, na[:, n - 1, :], rtol=5e-3, atol=1e-5)
        text_q = np.flatnonzero(~image)
        shares = na[:, text_q][:, :, image].sum(-1) / na[:, text_q].sum(-1)
        np.testing.assert_allclose(per["image_share"][s].values, shares.mean(-1), rtol=5e-3)
        after = text_q[text_q > np.argmax(image)]
        np.testing.assert_allclose(
            per["image_share_after_image"][s].values, shares[:, np.isin(text_q, after)].mean(-1), rtol=5e-3
        )


def test_means_heatmap_and_top_tokens(analysis_stores):
    tree = open_store(analysis_stores["gqa"])
    means = norm_attention(tree)
    assert sorted(means.prompt_kind.values) == ["empty", "noisy", "normal"]
    assert ((means["image_share"] >= 0) & (means["image_share"] <= 1)).all()
    [s] = pick_samples(tree, [str(tree["activations"].image_id.values[1]) + ":noisy"])
    assert str(tree["activations"].prompt_kind.values[s]) == "noisy"
    heat = last_query_heatmap(tree, s)
    assert heat.dims == ("layer", "token") and heat.sizes["token"] == int(tree["activations"].n_tokens[s])
    table = top_image_tokens(tree, [s], top=5)
    assert len(table) == 5 * heat.sizes["layer"]
    assert list(heat["layer"].values) == list(range(1, heat.sizes["layer"] + 1))  # decoder layers 1 .. L
    first = table[table.layer == 1]
    image_pos = np.flatnonzero(tree["activations"].modality[s].values == 1)
    expected = np.argsort(-heat.values[0, image_pos], kind="stable")[:5]
    np.testing.assert_array_equal(first["image_token"].values, expected)
    assert ((first["row"] * 5 + first["col"]).values == expected).all()  # 5 x 5 patch grid
