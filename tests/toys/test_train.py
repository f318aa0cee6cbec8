"""Training runs end to end, seeded, and writes a checkpoint vislens loads (a few steps, tiny data)."""

from __future__ import annotations

import json

import pytest
import torch

from vislens.errors import ConfigError
from vislens.extract.adapters import load_adapter
from vislens.toys.shapes import scene
from vislens.toys.train import Batches, Stage, TrainConfig, random_init_toy, slot_text, train_toy

STAGES = (
    Stage("text", 2, 1e-3, ("decoder",), loss="all", images=False),
    Stage("align", 2, 1e-3, ("vision", "projector")),
    Stage("joint", 2, 1e-3, ("vision", "projector", "decoder")),
)


def _config(family: str, seed: int = 0) -> TrainConfig:
    return TrainConfig(family=family, seed=seed, n_train=8, batch_size=4, stages=STAGES, eval_every_stage=False)


@pytest.mark.parametrize("family", ["llava", "instructblip"])
def test_training_is_seeded_and_saves_a_loadable_checkpoint(family, tmp_path):
    model, _, report = train_toy(tmp_path / "a", _config(family))
    again, _, _ = train_toy(None, _config(family))
    other, _, _ = train_toy(None, _config(family, seed=1))
    first = dict(model.named_parameters())
    assert all(torch.equal(p, first[n]) for n, p in again.named_parameters())
    assert not all(torch.equal(p, first[n]) for n, p in other.named_parameters() if n in first)
    assert [s["stage"] for s in report.stages] == ["text", "align", "joint"]
    record = json.loads((tmp_path / "a" / "vislens_toy.json").read_text())
    assert record["trained"] and record["config"]["stages"][0]["name"] == "text"
    loaded = load_adapter(str(tmp_path / "a"), device="cpu")
    assert loaded.adapter.family == family


def test_frozen_parts_do_not_move(tmp_path):
    config = TrainConfig(n_train=8, batch_size=4, stages=(STAGES[1],), eval_every_stage=False)
    before, _ = random_init_toy("llava")
    after, _, _ = train_toy(None, config)
    moved = {n for n, p in after.named_parameters() if not torch.equal(p, dict(before.named_parameters())[n])}
    assert moved and all("vision_tower" in n or "multi_modal_projector" in n for n in moved)


def test_training_examples_match_the_processor_and_label_only_the_caption():
    model, processor = random_init_toy("llava")
    from vislens.extract.adapters import adapter_class

    adapter = adapter_class("llava")(model, processor)
    data = Batches(adapter, "llava", TrainConfig(n_train=4))  # checks its ids against the processor
    ids, labels, _ = data.example(0, 0, "What is it?", Stage("joint", 1, 0.0, ()))
    caption = [i for i, lab in zip(ids, labels) if lab != -100]
    assert processor.tokenizer.decode(caption[:-1]).strip() == data.captions[0][0]
    assert caption[-1] == processor.tokenizer.eos_token_id
    ids, labels, _ = data.example(0, 0, "What is it?", Stage("text", 1, 0.0, (), loss="all", images=False))
    assert adapter.image_token_id not in ids and labels[1:] == ids[1:]
    assert slot_text(scene("train", 0), "scene") in processor.tokenizer.decode(ids)


def test_unknown_slot_is_named():
    with pytest.raises(ConfigError, match="unknown slot 'pixels'"):
        slot_text(scene("train", 0), "pixels")
