"""A disk that fills mid-extraction: a clear error, finished samples intact, and a resume.

The full disk is a real fsspec filesystem (local files) that answers ENOSPC once a given
number of hidden-state shards have been written, as a full disk would.
"""

from __future__ import annotations

import errno

import fsspec
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem

from tests.store.conftest import extract_config
from tests.store.test_resume import assert_same_store
from vislens.errors import DiskFullError
from vislens.extract import extract
from vislens.store import DONE, PENDING, open_store


class FillingDisk(LocalFileSystem):
    """Local files; the ``room``-th hidden-state shard write and later ones fail with ENOSPC."""

    protocol = "fillingdisk"
    room: int | None = None
    written = 0

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("fillingdisk://"))

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        if "/hidden/c/" in str(path):
            if FillingDisk.room is not None and FillingDisk.written >= FillingDisk.room:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            FillingDisk.written += 1
        return super().pipe_file(path, value, mode=mode, **kwargs)


@pytest.fixture
def filling_disk():
    fsspec.register_implementation("fillingdisk", FillingDisk, clobber=True)
    FillingDisk.room, FillingDisk.written = 4, 0
    yield FillingDisk
    FillingDisk.room = None


def test_full_disk_names_the_problem_and_loses_nothing(filling_disk, toy_models, manifest, tmp_path):
    url = f"fillingdisk://{tmp_path / 's.zarr'}"
    with pytest.raises(DiskFullError, match="no space left while writing sample 4.*rerun the same command"):
        extract(extract_config(toy_models["gqa"], manifest, url, batch_size=1, storage_options={"auto_mkdir": True}))
    done = open_store(str(tmp_path / "s.zarr"))["activations"]["done"].values
    np.testing.assert_array_equal(done[:4], [DONE] * 4)
    assert (done[4:] == PENDING).all()

    filling_disk.room = None  # space freed
    result = extract(
        extract_config(toy_models["gqa"], manifest, url, batch_size=1, storage_options={"auto_mkdir": True})
    )
    assert (result.already_done, result.written) == (4, 8)
    extract(extract_config(toy_models["gqa"], manifest, str(tmp_path / "clean.zarr"), batch_size=1))
    assert_same_store(tmp_path / "s.zarr", tmp_path / "clean.zarr")
