"""--capture: vision-tower layers, the projector, attention and MLP outputs and any module by regex,
each its own array beside ``hidden``, equal to the model's own module outputs (issue 16)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr
from PIL import Image

from tests.helpers import load_reference
from vislens.errors import ConfigError, ModelError
from vislens.extract import ExtractConfig, extract
from vislens.store import open_store
from vislens.store.inspect import verify

FP16 = dict(rtol=2e-3, atol=2e-3)
POINTS = ("vision.layers", "projector", "decoder.attn_out", "decoder.mlp_out", r"re:.*layers\.1\.mlp\.down_proj")


@pytest.fixture(scope="module")
def captured(toy_models, manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("capture") / "s.zarr"
    config = ExtractConfig(
        model=str(toy_models["gqa"]),
        data=str(manifest),
        out=str(out),
        prompts=("normal", "empty"),
        limit=3,
        batch_size=4,  # one batch of samples of different lengths
        attention="none",
        capture=POINTS,
        progress=False,
    )
    extract(config)
    return out


def test_captures_open_in_plain_xarray_beside_hidden(captured):
    ds = xr.open_zarr(captured, group="captures", consolidated=False)
    assert set(ds.data_vars) == {
        "vision_layers",
        "projector",
        "attn_out",
        "mlp_out",
        "model_language_model_layers_1_mlp_down_proj",
    }
    assert ds["vision_layers"].dims == ("sample", "vision_layer", "vision_token", "vision_d")
    assert ds["vision_layers"].attrs["patch_grid"] == [5, 5] and ds["vision_layers"].attrs["prefix_tokens"] == 1
    assert ds["attn_out"].dims == ("sample", "layer", "token", "d_model")
    np.testing.assert_array_equal(ds["layer"].values, [1, 2, 3])
    assert ds["projector"].dims == ("sample", "image_token", "d_model")
    assert "hidden" in xr.open_zarr(captured, group="activations", consolidated=False).data_vars
    assert verify(str(captured)) == []


def test_captures_equal_the_models_own_module_outputs(captured, toy_models, manifest):
    tree = open_store(str(captured))
    acts, caps = tree["activations"].to_dataset(), tree["captures"].to_dataset()
    model, processor = load_reference(toy_models["gqa"])
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    for s in range(acts.sizes["sample"]):
        n = int(acts.n_tokens[s])
        image = Image.open(manifest.parent / records[int(acts.image_index[s])]["image"]).convert("RGB")
        pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            vision = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
            features = model.model.get_image_features(pixel_values=pixels).pooler_output[0]
        np.testing.assert_allclose(
            caps.vision_layers[s].values.astype(np.float32), torch.stack(vision[1:])[:, 0].numpy(), **FP16
        )
        np.testing.assert_allclose(caps.projector[s].values.astype(np.float32), features.numpy(), **FP16)
        # independent of hooks: each decoder layer adds attention + MLP to the residual stream
        hidden = acts.hidden[s, :, :n].values.astype(np.float32)
        added = caps.attn_out[s, :, :n].values.astype(np.float32) + caps.mlp_out[s, :, :n].values.astype(np.float32)
        np.testing.assert_allclose(added[:-1], hidden[1:-1] - hidden[:-2], rtol=0, atol=2e-2)  # h_L is normed
        assert (caps.attn_out[s, :, n:].values == 0).all()  # padding
        np.testing.assert_array_equal(
            caps.model_language_model_layers_1_mlp_down_proj[s, :n].values, caps.mlp_out[s, 1, :n].values
        )
        # the image tokens of layer 0 are the projector's output put in place
        image_pos = acts.modality[s, :n].values == 1
        np.testing.assert_allclose(hidden[0, image_pos], caps.projector[s].values.astype(np.float32), **FP16)


def test_bad_capture_points_are_refused(toy_models, manifest, tmp_path):
    with pytest.raises(ConfigError, match="--capture takes"):
        ExtractConfig(model="m", data="d", out="o", capture=("vision",))
    with pytest.raises(ModelError, match="no module name matches"):
        extract(
            ExtractConfig(
                model=str(toy_models["gqa"]),
                data=str(manifest),
                out=str(tmp_path / "s.zarr"),
                limit=1,
                capture=("re:nothing.here",),
                progress=False,
            )
        )
    assert not (tmp_path / "s.zarr").exists()


def test_instructblip_vision_layers_and_projector(manifest, tmp_path):
    """InstructBLIP: the ViT's layers before the Q-Former, and language_projection (the query tokens)."""
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    from vislens.toys import ToyInstructBlipSpec, build_toy_instructblip

    model_path = build_toy_instructblip(tmp_path / "m", ToyInstructBlipSpec(layers=2, seed=4))
    out = tmp_path / "s.zarr"
    extract(
        ExtractConfig(
            model=str(model_path),
            data=str(manifest),
            out=str(out),
            limit=2,
            attention="none",
            capture=("vision.layers", "projector"),
            progress=False,
        )
    )
    tree = open_store(str(out))
    acts, caps = tree["activations"].to_dataset(), tree["captures"].to_dataset()
    model = InstructBlipForConditionalGeneration.from_pretrained(model_path).eval()
    processor = InstructBlipProcessor.from_pretrained(model_path)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    for s in range(acts.sizes["sample"]):
        image = Image.open(manifest.parent / records[int(acts.image_index[s])]["image"]).convert("RGB")
        pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            vision = model.vision_model(pixels, output_hidden_states=True).hidden_states
        np.testing.assert_allclose(
            caps.vision_layers[s].values.astype(np.float32), torch.stack(vision[1:])[:, 0].numpy(), **FP16
        )
        n = int(acts.n_tokens[s])
        image_pos = acts.modality[s, :n].values == 1
        np.testing.assert_allclose(
            acts.hidden[s, 0, :n].values[image_pos].astype(np.float32),
            caps.projector[s].values.astype(np.float32),
            **FP16,
        )
