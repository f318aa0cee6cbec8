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
    """Every array of every group, nested ones (results/...) included, equal bit for bit (NaN where
    NaN), and the same extraction arguments."""
    ra, rb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert ra.attrs["vislens_fingerprint"] == rb.attrs["vislens_fingerprint"]
    assert ra.attrs["extraction"]["args"] == rb.attrs["extraction"]["args"]
    arrays = {path: node for path, node in ra.members(max_depth=None) if isinstance(node, zarr.Array)}
    assert sorted(arrays) == sorted(p for p, n in rb.members(max_depth=None) if isinstance(n, zarr.Array))
    assert any(path.startswith("activations/") for path in arrays)
    for path, array in arrays.items():
        got, want = array[...], rb[path][...]
        assert got.dtype == want.dtype, path
        if got.dtype.kind == "f":  # bit for bit: equal bytes (NaN payloads and signs of zero included)
            assert got.tobytes() == want.tobytes(), f"{path}: {np.sum(got != want)} elements differ"
        else:
            np.testing.assert_array_equal(got, want, err_msg=path)


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


STATISTICS = ("--compute", "cosine,norm-attention,lens")


@pytest.mark.parametrize("threads", ["1", "2"])
def test_kill_9_then_rerun_equals_an_uninterrupted_run(toy_models, manifest, tmp_path, threads):
    """Killed mid-run (in batches of 3, so that a batch may be cut), then rerun with no --threads
    or --batch-size: the rerun takes the store's own, and every array, the statistics of
    --compute included, equals an uninterrupted run's bit for bit."""
    out = tmp_path / "killed.zarr"
    first = ("--threads", threads, "--batch-size", "3", *STATISTICS)
    proc = subprocess.Popen(
        _cli(toy_models["mha"], manifest, out, *first), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
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

    resume = [a for a in _cli(toy_models["mha"], manifest, out, *STATISTICS) if a not in ("--batch-size", "1")]
    rerun = subprocess.run(resume, capture_output=True, text=True, check=True)
    assert f"{12 - finished_before} samples written" in rerun.stdout
    assert f"{finished_before} already done" in rerun.stdout
    recorded = zarr.open_group(str(out), mode="r").attrs["extraction"]
    assert recorded["batch_size"] == 3 and recorded["threads"]["torch"] == int(threads)

    clean = tmp_path / "clean.zarr"
    subprocess.run(_cli(toy_models["mha"], manifest, clean, *first), capture_output=True, check=True)
    assert_same_store(out, clean)


def test_the_store_does_not_depend_on_threads_or_batch_size(toy_models, manifest, tmp_path):
    """The same extraction at 1, 2 and 3 torch/numba threads (3 on a 2-core machine too) and in
    batches of 1, 2 and 3: every array equal bit for bit, the statistics of --compute included."""
    runs = [("1", "3"), ("3", "1"), ("2", "2")]
    stores = []
    for threads, batch in runs:
        out = tmp_path / f"t{threads}-b{batch}.zarr"
        command = _cli(toy_models["gqa"], manifest, out, "--threads", threads, *STATISTICS)
        command[command.index("--batch-size") + 1] = batch
        env = {**os.environ, "NUMBA_NUM_THREADS": "3"}
        subprocess.run(command, capture_output=True, check=True, env=env)
        stores.append(out)
    for other in stores[1:]:
        assert_same_store(other, stores[0])


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
