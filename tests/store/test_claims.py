"""Writers' claims with real processes: a live writer's blocks are refused to another, on a local
folder and on S3; disjoint blocks are not; a killed writer's claim is stale (at once on a local
folder, after its missed heartbeats on S3); two extractions started on one store: one is refused."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from tests.conftest import S3_BUCKET
from tests.store.test_resume import _cli, assert_same_store
from vislens.errors import StoreLockedError
from vislens.store import DONE, claims
from vislens.store.location import StoreLocation

ROOT = Path(__file__).resolve().parents[2]
BEAT = 0.3  # seconds between heartbeats of claims on S3 in these tests


@pytest.fixture
def fast_heartbeat(monkeypatch):
    monkeypatch.setattr(claims, "HEARTBEAT_S", BEAT)
    monkeypatch.setenv("VISLENS_CLAIM_HEARTBEAT_S", str(BEAT))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _holder(location: StoreLocation, group: str, blocks: str, tmp_path: Path) -> subprocess.Popen:
    """A process holding a claim (started, and waited for until it holds it)."""
    ready = tmp_path / f"ready-{time.monotonic_ns()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.store.claim_process", location.url, json.dumps(location.storage_options)]
        + [group, blocks, str(ready)],
        cwd=ROOT,
        env=_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the claim holder did not start: {proc.stderr.read()}")
        time.sleep(0.05)
    return proc


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path, fast_heartbeat):
    if request.param == "local":
        return StoreLocation(str(tmp_path / "s.zarr"))
    s3 = request.getfixturevalue("s3")
    return StoreLocation(f"s3://{S3_BUCKET}/claims-{time.monotonic_ns()}/s.zarr", s3)


def test_a_live_writers_blocks_are_refused_until_it_dies(location, tmp_path, caplog):
    holder = _holder(location, "activations", "0,2", tmp_path)
    try:
        with pytest.raises(StoreLockedError, match=r"another writer is shard|another writer is test holder"):
            claims.claim(location, "activations", [2, 3])
        with pytest.raises(StoreLockedError, match="whole store|test holder"):
            claims.claim(location, "activations", claims.ALL, what="creating")
        other_group = claims.claim(location, "ablation", [0, 2])  # another group's blocks are other files
        disjoint = claims.claim(location, "activations", [1, 3])
        other_group.release()
        disjoint.release()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="vislens"):
        taken = claims.claim(location, "activations", [2, 3])  # the dead writer's claim is stale
    waited = time.monotonic() - started
    taken.release()
    watched = "to see whether the writers of" in caplog.text  # waited for heartbeats that never came
    if location.is_local:
        assert not watched  # the flock died with the process: taken at once, no heartbeats watched
    else:
        assert watched and "removing the stale writer claim" in caplog.text
        assert waited >= claims.STALE_BEATS * BEAT * 0.9  # a loaded machine only makes this longer
    folder = claims.claims_folder(location)
    left = os.listdir(folder) if location.is_local and os.path.isdir(folder) else []
    assert left == []  # released claims leave nothing behind


def test_a_claim_held_for_the_whole_store_refuses_every_writer(location, tmp_path):
    holder = _holder(location, "activations", "all", tmp_path)
    try:
        for group in ("activations", "ablation"):
            with pytest.raises(StoreLockedError, match="creating or replacing the whole store"):
                claims.claim(location, group, [5])
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_two_extractions_started_on_one_store_one_is_refused(toy_models, manifest, store_path, tmp_path):
    """The first run is paused (after its claim, before its first sample) while the same command
    is started again: that one exits with the claim's error, writing nothing; the first then
    finishes, and the store equals an uninterrupted run."""
    out, release = tmp_path / "s.zarr", tmp_path / "release"
    command = _cli(toy_models["gqa"], manifest, out)
    first = subprocess.Popen(
        [sys.executable, "-m", "tests.store.paused_process", str(release), "--"] + command[3:],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    paused = release.with_suffix(".paused")
    deadline = time.monotonic() + 120
    while not paused.exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    second = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, (second.stdout, second.stderr)
    assert "another writer is shard 0/1" in second.stderr and "writes nothing" in second.stderr
    done = zarr.open_group(str(out), mode="r")["activations/done"][:]
    assert not (done == DONE).any()  # the refused run wrote no sample
    release.touch()
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert "12 samples written" in stdout
    assert_same_store(out, store_path)  # the session's store: the same extraction, run alone
    assert np.all(zarr.open_group(str(out), mode="r")["activations/done"][:] == DONE)


def test_an_ablation_writes_no_pair_of_blocks_another_writer_holds(toy_models, manifest, tmp_path):
    from vislens.ablate import AblateConfig, ablate

    out = tmp_path / "a.zarr"
    config = AblateConfig(
        model=str(toy_models["gqa"]), data=str(manifest), out=str(out), ks=(1, 25), limit=4, block=2, progress=False
    )
    location = StoreLocation(str(out))
    held = claims.claim(location, "ablation", [1], what="another ablation")
    try:
        with pytest.raises(StoreLockedError, match="another ablation of ablation"):
            ablate(config)  # creating the store claims all of it
        assert not (out / "ablation").exists()  # refused before creating anything
    finally:
        held.release()
    first = ablate(AblateConfig(**{**config.__dict__, "shard": (0, 2)}))  # creates the group, writes block 0
    assert (first.written, first.n_pairs) == (10, 10)  # 2 images x 5 prompts
    held = claims.claim(location, "ablation", [1], what="another ablation")
    try:
        with pytest.raises(StoreLockedError, match="another ablation"):  # shard 1/2 owns block 1
            ablate(AblateConfig(**{**config.__dict__, "shard": (1, 2)}))
    finally:
        held.release()
    done = xr.open_zarr(str(out), group="ablation")["done"].values
    assert (done[:2] == DONE).all() and not (done[2:] == DONE).any()  # the refused run wrote nothing
    second = ablate(AblateConfig(**{**config.__dict__, "shard": (1, 2)}))
    assert (second.written, second.already_done) == (10, 0)
    assert (xr.open_zarr(str(out), group="ablation")["done"].values == DONE).all()
