"""The study's findings, asserted on the shipped trained toys (no training here; seconds on 2 CPU cores).

Bounds come from the measurements in docs/toy-model.md, with a margin. Each finding is checked
beside the same architecture at random init, which must not show it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vislens.ablate import AblateConfig, ablate
from vislens.analyze.ablation import ablation_group, truncation_curve
from vislens.toys.evaluate import caption_f1, lens_scores
from vislens.toys.shapes import make_shapes
from vislens.toys.train import random_init_toy
from vislens.toys.trained import TRAINED_FAMILIES, load_trained_toy, trained_toy_path

F1_MIN = 0.8
RECALL_MIN = 0.2
RISE = {"llava": 2.0, "instructblip": 1.3}
"""Lens recall at the best layer over layer 0's, at least. The card (docs/toy-model.md, 48 scenes)
measures 4.6x [3.6x, 6.3x] and 1.6x [1.3x, 2.0x]: InstructBLIP's rise is real but smaller than
the 2x the card asks of the study's finding, so it counts there as not reproduced."""


@pytest.fixture(scope="module", params=TRAINED_FAMILIES)
def toy(request):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return request.param, *load_trained_toy(request.param)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("held-out"), 12, split="test", start=100)


def test_held_out_captions_are_right(toy):
    family, model, processor = toy
    f1, got = caption_f1(model, processor, 48)
    assert f1 >= F1_MIN, (family, f1, got[:4])
    random_f1, _ = caption_f1(*random_init_toy(family), 8)
    assert random_f1 < 0.3


def test_lens_recall_rises_with_depth_and_beats_random_init(toy):
    family, model, processor = toy
    trained = lens_scores(model, processor, 32)
    random = lens_scores(*random_init_toy(family), 32)
    best = trained.best_layer
    assert best > 0
    assert trained.recall[best] >= RECALL_MIN, (family, trained.recall)
    # LLaVA: measured 0.07 -> 0.30 (4x); InstructBLIP: 0.16 -> 0.25 (1.5x), its layer 0 being the
    # Q-Former's projected queries, which already name some cells (docs/toy-model.md)
    assert trained.recall[best] >= RISE[family] * trained.recall[0], (family, trained.recall)
    assert trained.recall[best] > random.recall.max() + 0.1, (family, trained.recall, random.recall)


def test_caption_loss_falls_as_image_tokens_are_added(toy, held_out, tmp_path):
    family, model, _ = toy
    n = int(model.config.num_query_tokens) if family == "instructblip" else 36
    out = tmp_path / "ablation.zarr"
    config = AblateConfig(
        model=str(trained_toy_path(family)),
        data=str(held_out),
        out=str(out),
        ks=(1, n // 2, n),
        device="cpu",
        progress=False,
    )
    ablate(config)
    curve = truncation_curve(ablation_group(str(out))).groupby("k")["mean_loss"].mean()
    assert curve[1] > curve[n // 2] > curve[n], curve
    assert curve[1] - curve[n] > 0.5, curve


def test_shipped_weights_are_small_and_load_like_any_checkpoint(toy):
    family, model, processor = toy
    path = trained_toy_path(family)
    assert (path / "model.safetensors").stat().st_size <= 20 * 2**20
    assert (path / "tokenizer.json").is_file() and (path / "processor_config.json").is_file()
    norms = [m.weight for name, m in model.named_modules() if "norm" in type(m).__name__.lower()]
    assert norms and all(not torch.allclose(w, torch.ones_like(w)) for w in norms)
    text = model.config.get_text_config()
    assert text.num_hidden_layers >= 6 and text.num_key_value_heads < text.num_attention_heads
    pieces = processor.tokenizer.tokenize("Briefly describe the content of the image")
    assert len(pieces) > 7  # some words split into pieces
    assert np.isfinite(sum(p.detach().sum().item() for p in model.parameters()))


def test_the_direct_lens_equals_vislens_on_a_store_of_the_same_scenes(toy, tmp_path):
    """`lens_scores` (on the model, fp32) and `vislens analyze logit-lens` (on the stored fp16
    states) give the same per-layer scores for the same held-out scenes and prompt."""
    from vislens.analyze import logit_lens
    from vislens.extract import ExtractConfig, extract
    from vislens.store import open_store
    from vislens.toys.evaluate import EVAL_PROMPT

    family, model, processor = toy
    n = 8
    data = make_shapes(tmp_path / "data", n, split="test", start=0)
    out = tmp_path / "s.zarr"
    extract(ExtractConfig(model=str(trained_toy_path(family)), data=str(data), out=str(out), prompt=EVAL_PROMPT,
                          device="cpu", progress=False))  # fmt: skip
    table = logit_lens(open_store(str(out)))
    direct = lens_scores(model, processor, n)
    for name in ("recall", "precision", "token_precision"):
        stored = table[name].squeeze(drop=True).values
        np.testing.assert_allclose(stored, getattr(direct, name), atol=0.02, err_msg=name)  # fp16 vs fp32 ties
