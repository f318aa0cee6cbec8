"""A crash between an ablation pair's arrays and its done flag: the pair is not done, and is redone.

The store lies on a real fsspec filesystem (local files) that fails one write with EIO, as a
failing disk or a killed process would: the write of ``token_loss``, the last of a pair's arrays
before its ``done`` flag, for pair (sample 1, prompt 2). Every other array of that pair is
already written then.
"""

from __future__ import annotations

import errno
import json
import shutil

import fsspec
import numpy as np
import pytest
import xarray as xr
from fsspec.implementations.local import LocalFileSystem

from tests.ablate.conftest import LOSS_TOL
from vislens.ablate import AblateConfig, ablate
from vislens.store import DONE, PENDING, SKIPPED

PAIR = (1, 2)


class CrashingDisk(LocalFileSystem):
    """Local files; write number ``fail_at`` (0-based) of the files whose path holds ``target`` fails."""

    protocol = "crashingdisk"
    target: str | None = None
    fail_at = 0
    seen = 0

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("crashingdisk://"))

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        if CrashingDisk.target is not None and CrashingDisk.target in str(path):
            CrashingDisk.seen += 1
            if CrashingDisk.seen - 1 == CrashingDisk.fail_at:
                raise OSError(errno.EIO, "Input/output error (injected)", str(path))
        return super().pipe_file(path, value, mode=mode, **kwargs)


@pytest.fixture
def crashing_disk():
    fsspec.register_implementation("crashingdisk", CrashingDisk, clobber=True)
    yield CrashingDisk
    CrashingDisk.target = None


def _config(model, data, out, **kwargs) -> AblateConfig:
    options = dict(limit=2, ks=(0, 3, 7, 25), batch_size=8, progress=False)
    return AblateConfig(model=str(model), data=str(data), out=str(out), **options | kwargs)


def test_crash_before_the_done_flag_leaves_the_pair_pending_and_a_resume_redoes_it(
    crashing_disk, toy_models, manifest, tmp_path
):
    path = tmp_path / "a.zarr"
    url = f"crashingdisk://{path}"
    # token_loss has one file per sample, rewritten by each of its 5 prompts: the 3rd write is prompt 2
    crashing_disk.target, crashing_disk.fail_at, crashing_disk.seen = "ablation/token_loss/c/1/", PAIR[1], 0
    with pytest.raises(OSError, match="injected"):
        ablate(_config(toy_models["gqa"], manifest, url, storage_options={"auto_mkdir": True}))
    ds = xr.open_zarr(path, group="ablation").load()
    done = ds["done"].values
    assert done[PAIR] == PENDING, "a pair whose arrays were not all written is marked done"
    assert (done[0] == DONE).all() and (done[1, : PAIR[1]] == DONE).all() and (done[1, PAIR[1] :] == PENDING).all()
    assert np.isfinite(ds["loss"].values[PAIR]).all()  # the arrays before token_loss were written

    crashing_disk.target = None
    resumed = ablate(_config(toy_models["gqa"], manifest, url, storage_options={"auto_mkdir": True}))
    assert (resumed.already_done, resumed.written) == (5 + PAIR[1], 5 - PAIR[1])
    clean = tmp_path / "clean.zarr"
    ablate(_config(toy_models["gqa"], manifest, clean))
    got, want = xr.open_zarr(path, group="ablation").load(), xr.open_zarr(clean, group="ablation").load()
    assert (got["done"] == DONE).all()
    for name in ("loss", "token_loss", "full_loss", "full_token_loss", "n_tokens", "token_id", "scored"):
        np.testing.assert_allclose(got[name].values, want[name].values, **LOSS_TOL, err_msg=name)


def test_skipped_pairs_stay_skipped_until_their_image_is_back(toy_models, manifest, write_manifest, tmp_path):
    """A resume with the image still missing writes nothing and keeps its pairs skipped; once the
    image is there, a resume writes exactly those pairs."""
    lines = [json.loads(line) for line in manifest.read_text().splitlines()][:2]
    for line in lines:
        line["image"] = str(manifest.parent / line["image"])
    present, lines[0]["image"] = lines[0]["image"], str(tmp_path / "later.png")
    data, out = write_manifest(lines), tmp_path / "a.zarr"
    first = ablate(_config(toy_models["mha"], data, out))
    assert (first.written, list(first.skipped)) == (5, [lines[0]["id"]])
    again = ablate(_config(toy_models["mha"], data, out))
    assert (again.already_done, again.written, list(again.skipped)) == (5, 0, [lines[0]["id"]])
    np.testing.assert_array_equal(xr.open_zarr(out, group="ablation")["done"].values[:, 0], [SKIPPED, DONE])
    shutil.copy(present, tmp_path / "later.png")
    last = ablate(_config(toy_models["mha"], data, out))
    assert (last.already_done, last.written, last.skipped) == (5, 5, {})
    assert (xr.open_zarr(out, group="ablation")["done"].values == DONE).all()
