"""Extraction: the store holds exactly the model's own hidden states, whatever the batching."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from tests.helpers import hidden_of, load_reference, run_reference
from vislens.errors import DataError, ImageError, StoreExistsError
from vislens.extract import ExtractConfig, extract
from vislens.store import DONE, IMAGE, PADDING, SKIPPED, TEXT, open_store

FP16 = dict(rtol=2e-3, atol=2e-3)


def _extract(model, data, out, **kwargs):
    options = dict(prompts=("normal", "empty"), progress=False, attention="none")
    options.update(kwargs)
    return extract(ExtractConfig(model=str(model), data=str(data), out=str(out), **options))


@pytest.mark.parametrize("arch", ["mha", "gqa"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_hidden_states_equal_the_models_own(toy_models, manifest, tmp_path, arch, batch_size):
    result = _extract(toy_models[arch], manifest, tmp_path / "s.zarr", batch_size=batch_size)
    assert result.written == 12 and not result.skipped
    acts = open_store(str(tmp_path / "s.zarr"))["activations"].to_dataset().load()
    model, processor = load_reference(toy_models[arch])
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    image_token = model.config.image_token_id
    assert acts.sizes["layer"] == model.config.text_config.num_hidden_layers + 1
    for s in range(acts.sizes["sample"]):
        record = records[int(acts.image_index[s])]
        assert str(acts.image_id[s].values) == record["id"]
        inputs, outputs = run_reference(
            model, processor, str(manifest.parent / record["image"]), str(acts.prompt_text[s].values)
        )
        ref = hidden_of(outputs)
        n = ref.shape[1]
        assert int(acts.n_tokens[s]) == n
        np.testing.assert_allclose(acts.hidden[s, :, :n].values.astype(np.float32), ref, **FP16)
        ids = inputs["input_ids"][0].numpy()
        np.testing.assert_array_equal(acts.token_id[s, :n].values, ids)
        expected = np.where(ids == image_token, IMAGE, TEXT)
        np.testing.assert_array_equal(acts.modality[s, :n].values, expected)
        assert (acts.modality[s, n:].values == PADDING).all()
        assert (acts.token_id[s, n:].values == -1).all()
        assert np.count_nonzero(expected == IMAGE) == 25
    assert (acts.done.values == DONE).all()


def test_store_opens_with_plain_xarray(toy_models, manifest, tmp_path):
    _extract(toy_models["gqa"], manifest, tmp_path / "s.zarr", limit=2)
    ds = xr.open_zarr(tmp_path / "s.zarr", group="activations", consolidated=False)
    assert ds["hidden"].dims == ("sample", "layer", "token", "d_model")
    assert "hidden" in ds.data_vars  # no variable is named like its own dimension
    assert ds["hidden"].dtype == np.float16
    assert "hidden" in ds[["hidden", "n_tokens"]].mean("sample").data_vars
    assert ds["modality"].attrs["flag_meanings"] == "padding image text"
    assert ds["token_role"].attrs["flag_meanings"] == "padding image instruction template bos"
    root = xr.open_zarr(tmp_path / "s.zarr", consolidated=False)
    assert root.attrs["vislens_format_version"] == 2
    for name in ("activations", "lens", "captions"):  # (attention: tests/store/test_format.py)
        group = xr.open_zarr(tmp_path / "s.zarr", group=name, consolidated=False)
        assert not set(group.data_vars) & set(group.dims), name


def test_missing_image_is_skipped_and_counted(toy_models, manifest, write_manifest, tmp_path):
    lines = [json.loads(line) for line in manifest.read_text().splitlines()][:3]
    for line in lines:
        line["image"] = str(manifest.parent / line["image"])
    lines[1]["image"] = str(tmp_path / "nowhere.png")
    data = write_manifest(lines)
    result = _extract(toy_models["mha"], data, tmp_path / "s.zarr", prompts=("normal",))
    assert result.written == 2
    assert list(result.skipped) == [lines[1]["id"]]
    assert "does not exist" in result.skipped[lines[1]["id"]]
    assert "skipped" in result.summary()
    done = open_store(str(tmp_path / "s.zarr"))["activations"]["done"].values
    np.testing.assert_array_equal(done, [DONE, SKIPPED, DONE])


def test_missing_image_with_strict_fails_and_keeps_earlier_samples(toy_models, manifest, write_manifest, tmp_path):
    lines = [json.loads(line) for line in manifest.read_text().splitlines()][:3]
    for line in lines:
        line["image"] = str(manifest.parent / line["image"])
    lines[2]["image"] = str(tmp_path / "gone.png")
    data = write_manifest(lines)
    with pytest.raises(ImageError, match="gone.png does not exist"):
        _extract(toy_models["mha"], data, tmp_path / "s.zarr", prompts=("normal",), batch_size=1, strict=True)
    done = open_store(str(tmp_path / "s.zarr"))["activations"]["done"].values
    np.testing.assert_array_equal(done, [DONE, DONE, 0])


def test_corrupt_image_is_reported(toy_models, manifest, write_manifest, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    data = write_manifest([{"id": "bad", "image": str(bad), "captions": ["x"]}])
    with pytest.raises(ImageError, match="cannot be decoded"):
        _extract(toy_models["mha"], data, tmp_path / "s.zarr", prompts=("normal",), strict=True)


@pytest.mark.parametrize(
    "line, message",
    [
        ({"id": "a", "captions": ["x"]}, 'missing "image"'),
        ({"image": "a.png"}, 'missing "id"'),
        ({"id": "a", "image": "a.png", "captions": [""]}, "empty caption"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_manifest_lines_are_named(toy_models, write_manifest, tmp_path, line, message):
    data = write_manifest([line])
    with pytest.raises(DataError, match=message) as info:
        _extract(toy_models["mha"], data, tmp_path / "s.zarr")
    assert "manifest.jsonl:1" in str(info.value)
    assert not (tmp_path / "s.zarr").exists()


def test_output_path_holding_something_else_is_refused(toy_models, manifest, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(StoreExistsError, match="not a vislens store"):
        _extract(toy_models["mha"], manifest, out)
    assert (out / "thesis.tex").read_text() == "precious"
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_fixed_noisy_prompts_from_a_file(toy_models, manifest, tmp_path):
    """--noisy-prompts-file: the study prints its own noisy strings; they are used as given, cycled
    over the images, their ids kept, and their tokens are the instruction."""
    from tests.helpers import assert_instruction_roles
    from vislens.store.schema import ROLE_INSTRUCTION

    strings = {"n1": "square large blue the of", "n2": "circle ASSISTANT: green small"}
    path = tmp_path / "noisy.json"
    path.write_text(json.dumps(strings))
    _extract(
        toy_models["gqa"], manifest, tmp_path / "s.zarr", prompts=("noisy",), noisy_prompts_file=str(path), limit=3
    )
    tree = open_store(str(tmp_path / "s.zarr"))
    acts = tree["activations"].to_dataset()
    assert [str(v) for v in acts.prompt_id.values] == ["n1", "n2", "n1"]
    assert [str(v) for v in acts.prompt_text.values] == [strings["n1"], strings["n2"], strings["n1"]]
    assert tree.attrs["prompts"]["noisy_file"] == str(path)
    _, processor = load_reference(toy_models["gqa"])
    for s in range(3):
        assert (acts.token_role[s].values == ROLE_INSTRUCTION).sum() >= 4
        assert_instruction_roles(acts, s, processor.tokenizer)


@pytest.mark.timeout(120)  # a retry loop without end would fail here, not a timing assertion
def test_a_model_that_cannot_be_loaded_fails_fast_in_one_line(tmp_path, monkeypatch):
    """A missing folder says so; a hub id that is neither cached nor reachable fails once (with a
    5 s timeout; transformers alone retries for about half a minute, warning each time)."""

    from vislens.errors import ModelError
    from vislens.extract.adapters import check_model_source

    with pytest.raises(ModelError, match="model folder .*nowhere does not exist"):
        check_model_source(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        check_model_source(str(tmp_path / "empty"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(ModelError, match="cannot get vislens-test/no-such-model|not in the local"):
        check_model_source("vislens-test/no-such-model", timeout=5)  # no hang: the test's own timeout would fail it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE is set"):
        check_model_source("vislens-test/no-such-model")
