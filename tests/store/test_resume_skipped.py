"""Resuming after skipped and pending samples: each kind of sample is handled by its own rule.

A first run skips the samples of a missing image and then stops on a full disk, leaving samples
done, skipped and pending. Resuming with the image still missing writes exactly the pending
samples and leaves the skipped ones skipped (flag 2, not done, not pending). Once the image is
there, a resume tries the skipped samples again and writes them, and the store equals a clean run.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.store.conftest import extract_config
from tests.store.test_disk_full import filling_disk  # noqa: F401 - a fixture
from tests.store.test_resume import assert_same_store
from vislens.errors import DiskFullError
from vislens.extract import extract
from vislens.store import DONE, PENDING, SKIPPED, open_store
from vislens.store.inspect import info

D, S, P = DONE, SKIPPED, PENDING


def test_resume_keeps_skipped_samples_skipped_and_writes_pending_ones(
    filling_disk,  # noqa: F811 - the fixture imported above
    toy_models,
    manifest,
    write_manifest,
    tmp_path,  # noqa: F811
):
    lines = [json.loads(line) for line in manifest.read_text().splitlines()][:4]
    for line in lines:
        line["image"] = str(manifest.parent / line["image"])
    present = lines[1]["image"]
    lines[1]["image"] = str(tmp_path / "later.png")  # missing for now
    data = write_manifest(lines)
    url = f"fillingdisk://{tmp_path / 's.zarr'}"
    options = dict(batch_size=1, storage_options={"auto_mkdir": True})

    def flags():
        return open_store(str(tmp_path / "s.zarr"))["activations"]["done"].values

    filling_disk.room = 3  # samples 0, 1 and 4 are written, sample 5 fills the disk
    with pytest.raises(DiskFullError):
        extract(extract_config(toy_models["gqa"], data, url, **options))
    np.testing.assert_array_equal(flags(), [D, D, S, S, D, P, P, P])
    assert info(str(tmp_path / "s.zarr"))["samples"] == {"total": 8, "done": 3, "skipped": 2, "pending": 3}

    filling_disk.room = None  # space freed; the image is still missing
    again = extract(extract_config(toy_models["gqa"], data, url, **options))
    assert (again.already_done, again.written) == (3, 3)
    assert list(again.skipped) == [lines[1]["id"]]
    np.testing.assert_array_equal(flags(), [D, D, S, S, D, D, D, D])

    shutil.copy(present, tmp_path / "later.png")  # the image is back
    last = extract(extract_config(toy_models["gqa"], data, url, **options))
    assert (last.already_done, last.written, last.skipped) == (6, 2, {})
    assert (flags() == DONE).all()

    extract(extract_config(toy_models["gqa"], data, str(tmp_path / "clean.zarr"), batch_size=1))
    assert_same_store(tmp_path / "s.zarr", tmp_path / "clean.zarr")
