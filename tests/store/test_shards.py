"""Whole-shard writes: `encode_sample_shard` writes the very bytes zarr writes; indices are checked."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import zarr

from vislens.store.create import hidden_codecs, small_codecs
from vislens.store.location import StoreLocation
from vislens.store.shards import encode_sample_shard, is_sample_shard_layout, sample_shard_key
from vislens.store.writer import StoreWriter


def _array(root, name, shape, dtype, codecs, fill):
    store = zarr.storage.LocalStore(root)
    return zarr.create_array(
        store,
        name=name,
        shape=shape,
        chunks=(1, 1, *shape[2:]),
        shards=(1, *shape[1:]),
        dtype=dtype,
        compressors=codecs,
        fill_value=fill,
        config={"write_empty_chunks": True},
    )


@pytest.mark.parametrize(
    ("name", "shape", "dtype", "fill"),
    [
        ("activations/hidden", (3, 5, 37, 24), "float16", np.nan),  # sizes no Blosc block divides
        ("attention/attn", (2, 4, 3, 5, 37), "float16", np.nan),
        ("attention/value_gram", (2, 4, 37, 3, 3), "float32", np.nan),
    ],
)
def test_same_bytes_as_zarr(tmp_path, name, shape, dtype, fill):
    arr = _array(tmp_path, name, shape, dtype, hidden_codecs(1, np.dtype(dtype).itemsize), fill)
    assert is_sample_shard_layout(arr)
    rng = np.random.default_rng(0)
    sample = (rng.standard_normal(shape[1:]) * 30).astype(dtype)
    sample.reshape(-1)[:7] = 0  # exact zeros
    sample[-1] = fill  # a layer all fill value: written all the same (write_empty_chunks)
    arr[1] = sample
    key = sample_shard_key(arr, 1)
    written = (tmp_path / key).read_bytes()
    with ThreadPoolExecutor(2) as pool:
        assert encode_sample_shard(arr, sample, pool) == written


def test_other_layouts_are_not_taken_for_sample_shards(tmp_path):
    shape = (3, 5, 7, 8)
    assert not is_sample_shard_layout(_array(tmp_path, "zstd", shape, "float16", small_codecs(), 0))
    store = zarr.storage.LocalStore(tmp_path)
    two_per_shard = zarr.create_array(
        store, name="two", shape=shape, chunks=(1, 1, 7, 8), shards=(2, 5, 7, 8), dtype="float16",
        compressors=hidden_codecs(1),
    )  # fmt: skip
    assert not is_sample_shard_layout(two_per_shard)


def test_wrong_shape_is_refused(tmp_path):
    arr = _array(tmp_path, "h", (2, 3, 4, 5), "float16", hidden_codecs(1), 0)
    with ThreadPoolExecutor(1) as pool, pytest.raises(ValueError, match=r"shape \(3, 4, 5\)"):
        encode_sample_shard(arr, np.zeros((3, 4, 6), np.float16), pool)


def test_writer_checks_sample_indices(store_copy):
    writer = StoreWriter(StoreLocation(str(store_copy)))
    n = writer.n_samples
    hidden = writer.arrays["hidden"]
    sample = np.zeros(hidden.shape[1:], np.float16)
    for bad in (n, -n - 1):
        with pytest.raises(IndexError, match=f"outside the store's {n} samples"):
            writer.write_arrays(bad, {"hidden": sample})
    writer.write_arrays(-1, {"hidden": sample})  # counts from the end, as numpy and zarr do
    assert (hidden[n - 1] == 0).all()
    assert sorted(p.name for p in (store_copy / "activations/hidden/c").iterdir()) == sorted(map(str, range(n)))
