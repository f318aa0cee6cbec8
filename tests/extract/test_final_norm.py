"""The final norm is measured at extraction, stored, and applied by the logit lens exactly once.

The toy checkpoints have random, non-unit norm weights, so a lens without the final norm, or
with it applied twice, gives other ids than the model's own logits.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import load_reference, run_reference
from vislens.analyze.logit_lens import logit_lens_topk
from vislens.errors import ModelError
from vislens.extract import ExtractConfig, extract
from vislens.extract.adapters import load_adapter
from vislens.store import open_store


def _config(model: Path, manifest: Path, out: Path) -> ExtractConfig:
    return ExtractConfig(
        model=str(model),
        data=str(manifest),
        out=str(out),
        prompts=("normal",),
        limit=3,
        progress=False,
        attention="none",
    )


def _last_layer_agrees_with_the_models_logits(store: Path, model_path: Path, manifest: Path) -> None:
    """Lens top-1 at layer L equals argmax of the model's own ``outputs.logits`` wherever the
    model's top-2 margin is wider than fp16 rounding of the stored state can move it."""
    tree = open_store(str(store))
    top = logit_lens_topk(tree, k=1).compute()
    acts = tree["activations"].to_dataset()
    model, processor = load_reference(model_path)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    compared = 0
    for s in range(acts.sizes["sample"]):
        record = records[int(acts.image_index[s])]
        inputs, outputs = run_reference(
            model, processor, str(manifest.parent / record["image"]), str(acts.prompt_text[s].values)
        )
        image = (inputs["input_ids"][0] == model.config.image_token_id).numpy()
        logits = outputs.logits[0, image].float()
        best = logits.topk(2, dim=-1).values
        clear = (best[:, 0] - best[:, 1]) > 0.05 * logits.abs().amax(-1)
        ours = top[s, -1].values[: image.size][image, 0]
        np.testing.assert_array_equal(ours[clear.numpy()], logits.argmax(-1).numpy()[clear.numpy()])
        compared += int(clear.sum())
    assert compared >= 10


def test_llama_decoders_carry_the_final_norm_and_the_last_layer_equals_the_models_logits(
    toy_models, manifest, tmp_path
):
    out = tmp_path / "s.zarr"
    extract(_config(toy_models["gqa"], manifest, out))
    layer = open_store(str(out))["activations"]["layer"]
    assert layer.attrs["final_norm_applied_to_last"] == 1
    assert "measured at extraction" in layer.attrs["final_norm_check"]
    _last_layer_agrees_with_the_models_logits(out, toy_models["gqa"], manifest)


def _pre_norm_adapter(model_path: Path):
    """An adapter whose last hidden state is the decoder's output BEFORE the final norm, as other
    decoder implementations return it: the check must notice and the lens must norm it."""
    loaded = load_adapter(str(model_path))
    adapter = loaded.adapter
    seen: dict[str, torch.Tensor] = {}
    adapter.final_norm.register_forward_pre_hook(lambda module, args: seen.__setitem__("h", args[0]))
    original = adapter.hidden_states

    def hidden_states(self, outputs):
        states = original(outputs)
        return (*states[:-1], seen["h"])

    adapter.hidden_states = types.MethodType(hidden_states, adapter)
    return loaded


def test_a_last_state_without_the_norm_is_detected_and_normed_by_the_lens(toy_models, manifest, tmp_path):
    out = tmp_path / "s.zarr"
    extract(_config(toy_models["mha"], manifest, out), loaded=_pre_norm_adapter(toy_models["mha"]))
    layer = open_store(str(out))["activations"]["layer"]
    assert layer.attrs["final_norm_applied_to_last"] == 0
    _last_layer_agrees_with_the_models_logits(out, toy_models["mha"], manifest)


def test_logits_that_neither_reading_reproduces_are_refused(toy_models, manifest, tmp_path):
    loaded = load_adapter(str(toy_models["gqa"]))
    loaded.adapter.logits = types.MethodType(
        lambda self, outputs: 30.0 * torch.tanh(outputs.logits / 30.0) + 1.0, loaded.adapter
    )
    with pytest.raises(ModelError, match="match neither lm_head"):
        extract(_config(toy_models["gqa"], manifest, tmp_path / "s.zarr"), loaded=loaded)
    assert not (tmp_path / "s.zarr").exists()
