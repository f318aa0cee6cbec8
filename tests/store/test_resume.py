"""Crash safety: kill -9 and rerun, reruns with other arguments, and concurrent shard writers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from tests.store.conftest import extract_config
from vislens.errors import StoreMismatchError
from vislens.extract import extract
from vislens.store import DONE, open_store


def assert_same_store(a, b):
    """Every array of every group equal, and the same extraction arguments."""
    ra, rb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert ra.attrs["vislens_fingerprint"] == rb.attrs["vislens_fingerprint"]
    assert ra.attrs["extraction"]["args"] == rb.attrs["extraction"]["args"]
    for name, group in ra.groups():
        arrays = dict(group.arrays())
        assert sorted(arrays) == sorted(dict(rb[name].arrays())), name
        for array_name, array in arrays.items():
            np.testing.assert_array_equal(array[...], rb[name][array_name][...], err_msg=f"{name}/{array_name}")


def _cli(model, data, out, *extra):
    return [
        sys.executable,
        "-m",
        "vislens",
        "extract",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--prompts",
        "normal,empty",
        "--batch-size",
        "1",
        "--no-progress",
        *extra,
    ]


def test_rerun_computes_nothing(toy_models, manifest, tmp_path):
    config = extract_config(toy_models["mha"], manifest, str(tmp_path / "s.zarr"), limit=2)
    assert extract(config).written == 4
    again = extract(config)
    assert (again.written, again.already_done) == (0, 4)


def test_kill_9_then_rerun_equals_an_uninterrupted_run(toy_models, manifest, tmp_path):
    out = tmp_path / "killed.zarr"
    proc = subprocess.Popen(
        _cli(toy_models["mha"], manifest, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    done = np.zeros(0)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done = zarr.open_group(str(out), mode="r")["activations/done"][:]
        except Exception:  # noqa: BLE001 - the store is still being created
            done = np.zeros(0)
        if (done == DONE).sum() >= 3:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished_before = int((zarr.open_group(str(out), mode="r")["activations/done"][:] == DONE).sum())
    assert 3 <= finished_before < 12, "the kill must land mid-run"

    rerun = subprocess.run(_cli(toy_models["mha"], manifest, out), capture_output=True, text=True, check=True)
    assert f"{12 - finished_before} samples written" in rerun.stdout
    assert f"{finished_before} already done" in rerun.stdout

    clean = tmp_path / "clean.zarr"
    subprocess.run(_cli(toy_models["mha"], manifest, clean), capture_output=True, check=True)
    assert_same_store(out, clean)


def test_rerun_with_other_arguments_is_refused_then_overwritten(toy_models, manifest, tmp_path):
    out = str(tmp_path / "s.zarr")
    extract(extract_config(toy_models["mha"], manifest, out, limit=2))
    before = open_store(out)["activations"].hidden.values
    with pytest.raises(StoreMismatchError, match="different arguments \\(limit: stored 2, now 3\\).*--overwrite"):
        extract(extract_config(toy_models["mha"], manifest, out, limit=3))
    np.testing.assert_array_equal(open_store(out)["activations"].hidden.values, before)
    result = extract(extract_config(toy_models["mha"], manifest, out, limit=3, overwrite=True))
    assert result.written == 6


def test_two_shard_processes_equal_one_process(toy_models, manifest, tmp_path):
    sharded, single = tmp_path / "sharded.zarr", tmp_path / "single.zarr"
    procs = [
        subprocess.Popen(
            _cli(toy_models["gqa"], manifest, sharded, "--shard", f"{i}/2", "--block", "2"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (1, 0)  # the non-creator starts first and waits
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert all("6 samples written" in out for out, _ in outputs)
    subprocess.run(_cli(toy_models["gqa"], manifest, single, "--block", "2"), check=True, capture_output=True)
    assert_same_store(sharded, single)
