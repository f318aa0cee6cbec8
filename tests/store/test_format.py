"""The format as a contract: readable without vislens, versioned, and safe to open."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tensorstore as ts
import xarray as xr
import zarr

from vislens.errors import StoreFormatError, StoreSafetyError
from vislens.store import FORMAT_VERSION, open_group, open_store


def _root_doc(path):
    return json.loads((path / "zarr.json").read_text())


def _write_root(path, doc):
    (path / "zarr.json").write_text(json.dumps(doc))


def test_plain_zarr_and_xarray_read_every_group(store_path):
    root = zarr.open_group(str(store_path), mode="r")
    assert root.attrs["vislens_format_version"] == FORMAT_VERSION
    hidden = root["activations/hidden"]
    assert hidden.metadata.dimension_names == ("sample", "layer", "token", "d_model")
    assert hidden.shards == (1,) + hidden.shape[1:]
    assert hidden.chunks == (1, 1) + hidden.shape[2:]
    for group in ("activations", "attention", "lens", "captions"):
        ds = xr.open_zarr(store_path, group=group, consolidated=False)
        assert len(ds.data_vars) > 0
        assert not set(ds.data_vars) & set(ds.dims), f"{group}: a variable named like its own dimension"
    attention = xr.open_zarr(store_path, group="attention", consolidated=False)
    layers = root["activations/hidden"].shape[1] - 1
    np.testing.assert_array_equal(attention["layer"].values, np.arange(1, layers + 1))  # decoder layers 1 .. L
    acts = xr.open_zarr(store_path, group="activations", consolidated=False)
    np.testing.assert_array_equal(acts.hidden.values, open_store(str(store_path))["activations"].hidden.values)


def test_every_array_has_a_crc32c_checksum(store_path):
    root = zarr.open_group(str(store_path), mode="r")
    for name, group in root.groups():
        for array_name, array in group.arrays():
            inner = array.metadata.codecs[0].codecs if array.shards else array.metadata.codecs
            assert any(type(c).__name__ == "Crc32cCodec" for c in inner), f"{name}/{array_name}"


def test_tensorstore_reads_identical_values(store_path):
    """An independent Zarr v3 implementation (tensorstore, C++) reads the same numbers."""
    ours = open_store(str(store_path))
    for group, name in [
        ("activations", "hidden"),
        ("activations", "token_id"),
        ("attention", "value_gram"),
        ("attention", "attn"),
        ("lens", "unembedding"),
    ]:
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(store_path / group / name)}}
        theirs = ts.open(spec, read=True).result().read().result()
        np.testing.assert_array_equal(theirs, ours[group][name].values, err_msg=f"{group}/{name}")


def test_other_format_version_is_refused_and_nothing_changes(store_copy):
    doc = _root_doc(store_copy)
    doc["attributes"]["vislens_format_version"] = 3
    _write_root(store_copy, doc)
    before = sorted(p.relative_to(store_copy) for p in store_copy.rglob("*"))
    with pytest.raises(StoreFormatError, match="format version 3, but this vislens reads versions 1, 2"):
        open_store(str(store_copy))
    assert sorted(p.relative_to(store_copy) for p in store_copy.rglob("*")) == before


def test_not_a_vislens_store(tmp_path):
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w", zarr_format=3)
    with pytest.raises(StoreFormatError, match="not a vislens store"):
        open_store(str(tmp_path / "other.zarr"))
    with pytest.raises(StoreFormatError, match="no zarr v3 store"):
        open_store(str(tmp_path / "nothing-here.zarr"))


def test_unfinished_creation_is_refused(store_copy):
    doc = _root_doc(store_copy)
    doc["attributes"]["vislens_status"] = "creating"
    _write_root(store_copy, doc)
    with pytest.raises(StoreFormatError, match="never finished being created"):
        open_store(str(store_copy))


def test_missing_group_is_named(store_copy):
    shutil.rmtree(store_copy / "lens")
    doc = _root_doc(store_copy)
    doc.pop("consolidated_metadata", None)
    _write_root(store_copy, doc)
    with pytest.raises(StoreFormatError, match="no group 'lens'"):
        open_group(str(store_copy), "lens")


def _add_array_metadata(store, path, data_type, codecs):
    (store / path).mkdir(parents=True)
    meta = {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [2],
        "data_type": data_type,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [2]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0,
        "codecs": codecs,
        "attributes": {},
        "dimension_names": ["x"],
    }
    (store / path / "zarr.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "data_type, codecs, message",
    [
        ("int32", [{"name": "bytes"}, {"name": "numcodecs.pickle", "configuration": {}}], "codec 'numcodecs.pickle'"),
        ("object", [{"name": "bytes"}], "data type 'object'"),
        (
            "int32",
            [
                {
                    "name": "sharding_indexed",
                    "configuration": {
                        "chunk_shape": [1],
                        "codecs": [{"name": "numcodecs.pickle"}],
                        "index_codecs": [{"name": "bytes"}],
                    },
                }
            ],
            "codec 'numcodecs.pickle'",
        ),
    ],
)
def test_pickle_and_object_arrays_are_refused(store_copy, data_type, codecs, message):
    _add_array_metadata(store_copy, "results/evil", data_type, codecs)
    with pytest.raises(StoreSafetyError, match=message):
        open_store(str(store_copy))


def test_pickle_hidden_behind_consolidated_metadata_is_refused(store_copy):
    doc = _root_doc(store_copy)
    meta = doc["consolidated_metadata"]["metadata"]
    meta["activations/done"]["codecs"] = [{"name": "bytes"}, {"name": "numcodecs.pickle"}]
    _write_root(store_copy, doc)
    with pytest.raises(StoreSafetyError, match="numcodecs.pickle"):
        open_store(str(store_copy))


def test_extracting_into_a_store_of_another_version_is_refused(store_copy, toy_models, manifest):
    from tests.store.conftest import extract_config
    from vislens.extract import extract

    doc = _root_doc(store_copy)
    doc["attributes"]["vislens_format_version"] = 7
    _write_root(store_copy, doc)
    with pytest.raises(StoreFormatError, match="format version 7, this vislens writes version 2"):
        extract(extract_config(toy_models["gqa"], manifest, str(store_copy)))
    assert _root_doc(store_copy)["attributes"]["vislens_format_version"] == 7
