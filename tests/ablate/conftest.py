"""Models and inputs shared by the ablation tests, plus an independent transformers reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import load_reference
from vislens.ablate.inputs import encode_pairs, plan_pairs
from vislens.extract.adapters import load_adapter
from vislens.extract.datasets import load_data
from vislens.extract.images import load_image
from vislens.extract.prompts import Prompt

LOSS_TOL = dict(rtol=1e-4, atol=1e-4)
SHORT = Prompt("normal", "short", "Describe.")
LONG = Prompt("normal", "long", "Give a concise explanation of the image content and sum up what is shown briefly:")


@pytest.fixture(scope="session")
def loaded(toy_models):
    """vislens's LoadedModel of each toy checkpoint."""
    return {arch: load_adapter(str(path)) for arch, path in toy_models.items()}


@pytest.fixture(scope="session")
def hf(toy_models):
    """(model, processor) of each toy checkpoint, loaded directly with transformers."""
    return {arch: load_reference(path) for arch, path in toy_models.items()}


def pairs_of(adapter, manifest: Path, prompts: list[Prompt], image: int = 0):
    """(planned pairs, encoded PairInputs) of one image of the manifest under ``prompts``."""
    data = load_data(str(manifest), limit=image + 1)
    planned = [p for p in plan_pairs(data, prompts, adapter) if p.sample == image]
    with torch.inference_mode():
        inputs = encode_pairs(adapter, load_image(data.records[image].image), planned, "cpu")
    return planned, inputs


def hf_token_losses(model, processor, image_path: str, context: str, text: str, start, stop, style: str) -> np.ndarray:
    """(setting, caption_token) cross-entropies from the model's own forward on each truly ablated input.

    ``remove``: the removed image positions are left out of ``inputs_embeds``; ``block``: the full
    input with ``attention_mask`` 0 on them. Each setting's mean is checked against the model's own
    ``labels`` loss. InstructBLIP: the Q-Former reads the prompt alone; its language model is run.
    """
    image = Image.open(image_path).convert("RGB")
    full = processor(images=[image], text=[text], return_tensors="pt")
    prompt = processor(images=[image], text=[context], return_tensors="pt")
    n_context = prompt["input_ids"].shape[1]
    ids = full["input_ids"][0]
    image_pos = torch.nonzero(ids == model.config.image_token_id).flatten()
    rows = []
    with torch.no_grad():
        if model.config.model_type == "instructblip":
            qformer = {k: prompt[k] for k in ("qformer_input_ids", "qformer_attention_mask")}
            features = model.get_image_features(pixel_values=full["pixel_values"], **qformer).pooler_output[0]
            model = model.language_model
        else:
            features = model.model.get_image_features(pixel_values=full["pixel_values"]).pooler_output[0]
        embeds = model.get_input_embeddings()(ids).clone()
        embeds[image_pos] = features
        for s, e in zip(start, stop):
            removed = torch.zeros(len(ids), dtype=torch.bool)
            removed[image_pos[s:e]] = True
            labels = ids.clone()
            labels[:n_context] = -100
            if style == "remove":
                out = model(inputs_embeds=embeds[~removed][None], labels=labels[~removed][None])
                offset = int(removed.sum())
            else:
                out = model(inputs_embeds=embeds[None], attention_mask=(~removed).long()[None], labels=labels[None])
                offset = 0
            before = torch.arange(n_context, len(ids)) - 1 - offset
            losses = torch.nn.functional.cross_entropy(out.logits[0, before].float(), ids[n_context:], reduction="none")
            np.testing.assert_allclose(float(losses.mean()), float(out.loss), rtol=1e-5, atol=1e-6)
            rows.append(losses.numpy())
    return np.stack(rows)
