"""`vislens.ablate.ablate`: what the store holds, resuming, refusals and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr
from PIL import Image

import vislens.store.ablation as store_ablation
from tests.ablate.conftest import LOSS_TOL
from vislens.ablate import AblateConfig, ablate
from vislens.errors import DataError, StoreExistsError, StoreMismatchError
from vislens.extract import ExtractConfig, extract
from vislens.store import DONE, FORMAT_VERSION, IMAGE, PADDING, SKIPPED, TEXT, open_store
from vislens.store.schema import SAFE_CODECS, SAFE_DATA_TYPES


def _ablate(model, data, out, **kwargs):
    options = dict(limit=2, progress=False, batch_size=8)
    options.update(kwargs)
    return ablate(AblateConfig(model=str(model), data=str(data), out=str(out), **options))


def _load(out, group="ablation") -> xr.Dataset:
    return xr.open_zarr(out, group=group).load()


def test_store_holds_everything_needed_to_recompute_a_setting(toy_models, hf, manifest, tmp_path):
    out = tmp_path / "a.zarr"
    result = _ablate(toy_models["gqa"], manifest, out, ks=(0, 3, 7, 25))
    assert result.written == 10 and result.n_settings == 4
    tree = open_store(str(out))  # a valid vislens store: version, status and safety checks
    assert tree.attrs["vislens_format_version"] == FORMAT_VERSION and tree.attrs["vislens_status"] == "ready"
    assert set(tree.children) >= {"ablation", "captions"}
    from vislens.store.inspect import format_info, info

    report = info(str(out))  # an ablation-only store counts its (image, prompt) pairs, not "0 samples"
    assert report["unit"] == "ablation pairs" and report["samples"]["total"] == 10 and report["samples"]["done"] == 10
    assert "ablation pairs 10 done / 10 total" in format_info(report)
    ds = _load(out)
    assert ds["loss"].dims == ("sample", "prompt", "k") and ds["loss"].dtype == np.float32
    np.testing.assert_array_equal(ds["k"], [0, 3, 7, 25])
    assert (ds["done"] == DONE).all()
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [str(v) for v in ds["image_id"].values] == [r["id"] for r in records[:2]]
    assert str(ds["caption"].values[1]) == records[1]["captions"][0]
    assert ds.attrs["args"]["ks"] == [0, 3, 7, 25] and ds.attrs["mode"] == "truncate"
    np.testing.assert_allclose(ds["loss"].sel(k=25), ds["full_loss"], **LOSS_TOL)

    # recompute (sample 1, prompt 2, k = 7) from the stored ids alone, with transformers
    s, p, k = 1, 2, 7
    n = int(ds["n_tokens"][s, p])
    ids = torch.as_tensor(ds["token_id"].values[s, p, :n].astype(np.int64))
    modality, scored = ds["modality"].values[s, p, :n], ds["scored"].values[s, p, :n]
    assert set(np.unique(ds["modality"].values[s, p, n:])) == {PADDING}
    assert set(np.unique(modality)) == {IMAGE, TEXT} and scored.sum() > 0
    model, processor = hf["gqa"]
    image = Image.open(manifest.parent / records[s]["image"]).convert("RGB")
    pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixels).pooler_output[0]
        embeds = model.get_input_embeddings()(ids).clone()
        image_pos = np.flatnonzero(modality == IMAGE)
        embeds[image_pos] = features
        keep = np.ones(n, dtype=bool)
        keep[image_pos[k:]] = False
        logits = model(inputs_embeds=embeds[keep][None]).logits[0]
    targets = np.flatnonzero(scored[keep])
    token_loss = torch.nn.functional.cross_entropy(logits[targets - 1], ids[keep][targets], reduction="none")
    np.testing.assert_allclose(ds["token_loss"].sel(k=k).values[s, p, : len(targets)], token_loss.numpy(), **LOSS_TOL)
    np.testing.assert_allclose(float(ds["loss"].sel(k=k)[s, p]), float(token_loss.mean()), **LOSS_TOL)


def test_every_array_has_a_checksum_dimension_names_and_a_safe_type(toy_models, manifest, tmp_path):
    out = tmp_path / "a.zarr"
    _ablate(toy_models["mha"], manifest, out, limit=1, mode="mask", interval_width=10, mask_style="remove")
    docs = sorted((out / "ablation").glob("*/zarr.json"))
    assert len(docs) > 15
    for path in docs:
        doc = json.loads(path.read_text())
        codecs = json.dumps(doc["codecs"])
        assert "crc32c" in codecs, path
        assert doc["dimension_names"] and doc["data_type"] in SAFE_DATA_TYPES, path
        names = [c["name"] for c in doc["codecs"]] + [
            c["name"] for c in doc["codecs"][0].get("configuration", {}).get("codecs", [])
        ]
        assert set(names) <= SAFE_CODECS, path
    ds = _load(out)
    np.testing.assert_array_equal(ds["start"], [0, 10, 20])
    np.testing.assert_array_equal(ds["stop"], [10, 20, 25])
    assert ds["masked_loss"].dims == ("sample", "prompt", "setting")
    assert ds.attrs["mask_style"] == "remove"
    assert ds["prompt_text"].values[0] == "Briefly describe the content of the image:"


def test_resume_after_an_interruption_gives_the_same_store(toy_models, manifest, tmp_path, monkeypatch):
    kwargs = dict(mode="mask", intervals=((0, 4), (5, 20)), limit=3)
    _ablate(toy_models["gqa"], manifest, tmp_path / "whole.zarr", **kwargs)
    original = store_ablation.AblationWriter.write_pair
    calls = []

    def crash_on_the_fifth(self, sample, prompt, arrays):
        calls.append((sample, prompt))
        if len(calls) == 5:  # the data of pair 5 is half written, its done flag never
            self.arrays["masked_loss"][sample, prompt] = np.full(2, 123.0, dtype=np.float32)
            raise KeyboardInterrupt
        original(self, sample, prompt, arrays)

    monkeypatch.setattr(store_ablation.AblationWriter, "write_pair", crash_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        _ablate(toy_models["gqa"], manifest, tmp_path / "resumed.zarr", **kwargs)
    monkeypatch.setattr(store_ablation.AblationWriter, "write_pair", original)
    assert int((_load(tmp_path / "resumed.zarr")["done"] == DONE).sum()) == 4
    result = _ablate(toy_models["gqa"], manifest, tmp_path / "resumed.zarr", **kwargs)
    assert (result.already_done, result.written) == (4, 11)
    whole, resumed = _load(tmp_path / "whole.zarr"), _load(tmp_path / "resumed.zarr")
    for name in ("token_id", "modality", "scored", "n_tokens", "done"):
        np.testing.assert_array_equal(resumed[name], whole[name])
    for name in ("masked_loss", "token_loss", "full_loss", "full_token_loss"):
        np.testing.assert_allclose(resumed[name], whole[name], rtol=1e-5, atol=1e-6)
    assert _ablate(toy_models["gqa"], manifest, tmp_path / "resumed.zarr", **kwargs).written == 0


def test_other_arguments_are_refused_unless_overwrite(toy_models, manifest, tmp_path):
    out = tmp_path / "a.zarr"
    _ablate(toy_models["mha"], manifest, out, ks=(1, 25), limit=1)
    with pytest.raises(StoreMismatchError, match=r"ks: stored \[1, 25\], asked \[2, 25\].*--overwrite"):
        _ablate(toy_models["mha"], manifest, out, ks=(2, 25), limit=1)
    with pytest.raises(StoreMismatchError, match="mode"):
        _ablate(toy_models["mha"], manifest, out, mode="mask", limit=1)
    np.testing.assert_array_equal(_load(out)["k"], [1, 25])  # untouched
    result = _ablate(toy_models["mha"], manifest, out, ks=(2, 25), limit=1, overwrite=True)
    assert result.written == 5
    np.testing.assert_array_equal(_load(out)["k"], [2, 25])
    # a second ablation goes beside the first under another group name
    _ablate(toy_models["mha"], manifest, out, mode="mask", interval_width=25, limit=1, group="masking")
    assert set(open_store(str(out)).children) >= {"ablation", "masking"}


def test_ablation_is_added_to_an_existing_extraction_store(toy_models, manifest, tmp_path):
    out = tmp_path / "s.zarr"
    config = ExtractConfig(model=str(toy_models["gqa"]), data=str(manifest), out=str(out), limit=2, progress=False)
    config = ExtractConfig(**{**config.__dict__, "attention": "none"})
    extract(config)
    before = json.loads((out / "zarr.json").read_text())["attributes"]
    _ablate(toy_models["gqa"], manifest, out, ks=(5, 25))
    tree = open_store(str(out))
    assert set(tree.children) >= {"activations", "captions", "ablation"}
    after = json.loads((out / "zarr.json").read_text())["attributes"]
    assert after["vislens_fingerprint"] == before["vislens_fingerprint"]
    assert tree["ablation"]["loss"].shape == (2, 5, 2)
    assert extract(config).written == 0  # the extraction still resumes as finished


def test_unreadable_image_is_skipped_and_missing_captions_are_named(toy_models, manifest, write_manifest, tmp_path):
    lines = [json.loads(line) for line in manifest.read_text().splitlines()][:2]
    for line in lines:
        line["image"] = str(manifest.parent / line["image"])
    lines[0]["image"] = str(tmp_path / "gone.png")
    result = _ablate(toy_models["mha"], write_manifest(lines), tmp_path / "a.zarr", ks=(25,))
    assert list(result.skipped) == [lines[0]["id"]] and result.written == 5
    np.testing.assert_array_equal(_load(tmp_path / "a.zarr")["done"][:, 0], [SKIPPED, DONE])
    lines[1]["captions"] = []
    with pytest.raises(DataError, match=f"image {lines[1]['id']} has 0 reference caption"):
        _ablate(toy_models["mha"], write_manifest(lines, "b.jsonl"), tmp_path / "b.zarr")
    with pytest.raises(DataError, match="no caption 7"):
        _ablate(toy_models["mha"], manifest, tmp_path / "c.zarr", caption_index=7)
    assert not (tmp_path / "b.zarr").exists() and not (tmp_path / "c.zarr").exists()


def test_a_folder_that_is_not_a_store_is_left_alone(toy_models, manifest, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(StoreExistsError, match="not a vislens store"):
        _ablate(toy_models["mha"], manifest, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
