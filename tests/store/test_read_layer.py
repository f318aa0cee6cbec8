"""read_layer: one layer of many samples, equal to zarr's answer, checked, and refusing what it should."""

from __future__ import annotations

import shutil

import fsspec
import numpy as np
import pytest
import zarr

from vislens.errors import ChecksumError, StoreFormatError
from vislens.store import open_store, read_layer


def _zarr(path, array, samples, layer):
    return zarr.open_array(str(path / array), mode="r").oindex[samples, layer]


def test_attention_layers_are_numbered_from_one(store_path):
    attn = zarr.open_array(str(store_path / "attention/attn"), mode="r")
    np.testing.assert_array_equal(read_layer(str(store_path), 1, array="attention/attn"), attn[:, 0])
    with pytest.raises(IndexError, match="layers 1 .. 3; layer 0"):
        read_layer(str(store_path), 0, array="attention/attn")


@pytest.mark.parametrize("array", ["activations/hidden", "attention/attn", "attention/value_gram"])
def test_equals_zarr_for_every_per_sample_array(store_path, array):
    n = zarr.open_array(str(store_path / array), mode="r").shape[0]
    mask = np.arange(n) % 3 == 1
    first = 1 if array.startswith("attention/") else 0  # attention holds decoder layers 1 .. L
    for layer, samples in [
        (0, None),
        (-1, [5, 0, -1]),
        (2, slice(1, None, 3)),
        (1, np.array([], dtype=int)),
        (1, mask),
    ]:
        expect = _zarr(store_path, array, np.arange(n)[samples] if samples is not None else slice(None), layer)
        label = layer + first if layer >= 0 else layer
        got = read_layer(str(store_path), label, samples, array=array)
        assert got.dtype == expect.dtype and got.shape == expect.shape
        np.testing.assert_array_equal(got, expect)


def test_opened_tree_and_remote_fallback_read_the_same(store_path):
    expect = read_layer(str(store_path), 3)
    np.testing.assert_array_equal(read_layer(open_store(str(store_path)), 3), expect)
    url = "memory://vislens-read-layer/s.zarr"  # not local: read through zarr
    fsspec.filesystem("memory").put(str(store_path), url, recursive=True)
    np.testing.assert_array_equal(read_layer(url, 3), expect)


def test_missing_shard_reads_as_fill_and_bad_bytes_are_caught(store_copy):
    (store_copy / "activations/hidden/c/7/0/0/0").unlink()
    got = read_layer(str(store_copy), 2, [6, 7])
    np.testing.assert_array_equal(got, _zarr(store_copy, "activations/hidden", [6, 7], 2))
    assert np.isnan(got[1]).all() and not np.isnan(got[0]).any()
    shard = store_copy / "activations/hidden/c/4/0/0/0"
    data = bytearray(shard.read_bytes())
    data[20] ^= 0xFF  # inside layer 0's chunk
    shard.write_bytes(bytes(data))
    read_layer(str(store_copy), 1, [4])  # other layers of that shard are intact
    with pytest.raises(ChecksumError, match="c/4/0/0/0: layer 0"):
        read_layer(str(store_copy), 0, [4])
    shard.write_bytes(bytes(data[:-3]))  # truncated: the index's checksum fails
    with pytest.raises(ChecksumError, match="shard index"):
        read_layer(str(store_copy), 1, [4])


def test_refuses_other_stores_and_out_of_range(store_copy, tmp_path):
    with pytest.raises(IndexError, match="layers"):
        read_layer(str(store_copy), 99)
    with pytest.raises(IndexError, match="samples"):
        read_layer(str(store_copy), 0, [12])
    with pytest.raises(IndexError, match="mask"):
        read_layer(str(store_copy), 0, [True, False])
    with pytest.raises(StoreFormatError, match="no array"):
        read_layer(str(store_copy), 0, array="activations/nothing")
    shutil.copytree(store_copy, tmp_path / "plain")
    root = zarr.open_group(str(tmp_path / "plain"), mode="r+")
    root.attrs.put({})
    with pytest.raises(StoreFormatError, match="not a vislens store"):
        read_layer(str(tmp_path / "plain"), 0)
