"""Scale-out on a Dask cluster: a moto S3 server on loopback and a LocalCluster of 2 worker processes.

The same extraction runs through the cluster into the S3 store and in this process into a local
folder; the stores are equal, and so is every analysis (and the report) run through
``--scheduler`` on the S3 store to the same analysis run in this process on the local one. A
worker killed mid-extraction: the run completes, nothing lost, nothing computed twice. The
lens reaches each worker once and no task carries it; each sample is read by the worker that
computes on it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import cloudpickle
import dask
import numpy as np
import pandas as pd
import pytest
import zarr
from distributed import Client, LocalCluster, get_task_stream

from tests.conftest import S3_BUCKET
from vislens.analyze import cosine_per_sample, logit_lens_topk
from vislens.analyze import lens as lens_module
from vislens.cli import main
from vislens.extract import ExtractConfig
from vislens.extract.distributed import extract_on_cluster
from vislens.store import DONE, open_store
from vislens.store.location import StoreLocation
from vislens.store.writer import shard_blocks

BLOCK = 2
N_SAMPLES = 12  # 6 images x (normal, empty)


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of 2 single-threaded worker processes; yields a client of it."""
    local = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
    )
    client = Client(local, set_as_default=False)
    yield client
    client.close()
    local.close()


def _extract(model, manifest, out: str) -> list[str]:
    return ["extract", "--model", str(model), "--data", str(manifest), "--out", out, "--prompts", "normal,empty"] + [
        "--block",
        str(BLOCK),
        "--batch-size",
        "2",
        "--no-progress",
    ]


@pytest.fixture(scope="module")
def stores(cluster, s3, toy_models, manifest, tmp_path_factory):
    """One extraction twice: through the cluster (2 shards) into S3, and in this process locally."""
    url = f"s3://{S3_BUCKET}/cluster/s.zarr"
    options = ["--storage-options", json.dumps(s3)]
    with get_task_stream(cluster) as stream:
        assert (
            main([*_extract(toy_models["gqa"], manifest, url), "--scheduler", cluster.scheduler.address, *options]) == 0
        )
    shards = {t["key"] for t in stream.data if "vislens-extract" in str(t["key"])}
    assert len(shards) == 2  # the two shards ran as tasks on the workers
    local = str(tmp_path_factory.mktemp("local") / "s.zarr")
    assert main(_extract(toy_models["gqa"], manifest, local)) == 0
    return url, local


def test_extraction_through_the_cluster_equals_a_single_process_run(stores, s3):
    url, local = stores
    ours, theirs = open_store(url, s3), open_store(local)
    assert ours.attrs["vislens_fingerprint"] == theirs.attrs["vislens_fingerprint"]
    for group in ("activations", "attention", "lens", "captions"):
        a, b = ours[group].to_dataset(), theirs[group].to_dataset()
        assert sorted(a.data_vars) == sorted(b.data_vars)
        for name in b.data_vars:
            np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=f"{group}/{name}")
    assert (ours["activations"]["done"].values == DONE).all()


def _tables(folder) -> dict[str, pd.DataFrame]:
    """Every CSV written under ``folder``, without the columns that name the store."""
    return {
        str(path.relative_to(folder)): pd.read_csv(path).drop(columns=["store", "series"], errors="ignore")
        for path in sorted(folder.rglob("*.csv"))
    }


@pytest.mark.parametrize(
    "command",
    [
        ["analyze", "cosine"],
        ["analyze", "logit-lens", "--top-k", "2"],
        ["report", "--samples", "0,3"],  # every analysis (norm-attention's heatmaps too) in one run
    ],
    ids=["cosine", "logit-lens", "report"],
)
def test_every_analysis_through_the_scheduler_equals_a_local_run(command, stores, s3, cluster, tmp_path):
    url, local = stores
    remote = ["--scheduler", cluster.scheduler.address, "--storage-options", json.dumps(s3)]
    with get_task_stream(cluster) as stream:
        assert main([*command, url, *remote, "--out", str(tmp_path / "cluster")]) == 0
    assert len({t["worker"] for t in stream.data}) == 2  # both workers did part of the work
    with dask.config.set(scheduler="synchronous"):
        assert main([*command, local, "--out", str(tmp_path / "local")]) == 0
    ours, theirs = _tables(tmp_path / "cluster"), _tables(tmp_path / "local")
    assert ours.keys() == theirs.keys() and ours
    for name, table in theirs.items():
        pd.testing.assert_frame_equal(ours[name], table, obj=name, check_exact=True)  # the same table, to the bit


def test_the_unembedding_reaches_each_worker_once_and_no_task_carries_it(stores, s3, cluster):
    url, _ = stores
    tree = open_store(url, s3)
    unembedding = tree["lens"]["unembedding"].nbytes
    top = logit_lens_topk(tree, 2)
    (optimized,) = dask.optimize(top.data)
    sizes = [len(cloudpickle.dumps(task)) for task in dict(optimized.__dask_graph__()).values()]
    assert max(sizes) < unembedding / 8, (max(sizes), unembedding)  # the lens is not in any task
    cluster.run(lens_module.forget)
    before = cluster.run(lens_module.reads)
    with dask.config.set(scheduler=cluster), get_task_stream(cluster) as stream:
        first = top.compute()
        again = logit_lens_topk(tree, 1).compute()
    reads = {w: n - before[w] for w, n in cluster.run(lens_module.reads).items()}
    ran = {t["worker"] for t in stream.data}
    assert all(reads[w] == 1 for w in ran) and sum(reads.values()) == len(ran), reads
    np.testing.assert_array_equal(first.values[..., 0], again.values[..., 0])


def _moved(dask_worker) -> int:
    """Bytes this worker fetched from other workers since the log was last cleared."""
    total = sum(t["total"] for t in dask_worker.transfer_incoming_log)
    dask_worker.transfer_incoming_log.clear()
    return total


def test_each_sample_is_read_by_the_worker_that_computes_on_it(stores, s3, cluster):
    url, _ = stores
    tree = open_store(url, s3)
    per_sample = cosine_per_sample(tree)["inter_modal"]
    (optimized,) = dask.optimize(per_sample.data)
    names = {str(k[0] if isinstance(k, tuple) else k) for k in dict(optimized.__dask_graph__())}
    assert not any(n.startswith("vislens-activations-hidden") for n in names), names  # read inside the tasks
    cluster.run(_moved)
    with dask.config.set(scheduler=cluster):
        per_sample.compute()
    one_sample = tree["activations"]["hidden"].isel(sample=0).nbytes
    assert sum(cluster.run(_moved).values()) < one_sample  # only small per-sample arrays moved


def _done(url: str, s3: dict) -> np.ndarray:
    store = StoreLocation(url, s3).zarr_store(read_only=True)
    try:
        return zarr.open_group(store, mode="r", use_consolidated=False)["activations/done"][:]
    except Exception:  # noqa: BLE001 - not created yet
        return np.zeros(0)


def test_a_worker_killed_mid_extraction_loses_and_repeats_nothing(cluster, s3, toy_models, manifest, stores):
    url = f"s3://{S3_BUCKET}/killed/s.zarr"
    config = ExtractConfig(
        model=str(toy_models["gqa"]),
        data=str(manifest),
        out=url,
        prompts=("normal", "empty"),
        block=BLOCK,
        batch_size=1,
        progress=False,
        storage_options=s3,
    )
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(result=extract_on_cluster(config, cluster, shards=2)))
    runner.start()
    shard1 = shard_blocks(N_SAMPLES, BLOCK, (1, 2))
    victim, deadline = None, time.monotonic() + 240
    while time.monotonic() < deadline and runner.is_alive():
        busy = [w for w, keys in cluster.processing().items() if any(str(k).endswith("-1of2") for k in keys)]
        if busy and (_done(url, s3)[shard1] == DONE).sum() >= 1:
            victim = busy[0]
            break
        time.sleep(0.05)
    assert victim is not None, "shard 1 never started writing"
    pid = cluster.run(os.getpid, workers=[victim])[victim]
    finished_before = int((_done(url, s3)[shard1] == DONE).sum())
    os.kill(pid, signal.SIGKILL)
    runner.join(timeout=300)
    assert not runner.is_alive()
    assert 1 <= finished_before < len(shard1), "the kill must land mid-shard"
    result = outcome["result"]
    # the retried shard resumed: what was done before the kill counts as already done, the rest
    # was written once; nothing is missing
    assert result.already_done >= finished_before
    assert result.written + result.already_done == N_SAMPLES
    ours, theirs = open_store(url, s3), open_store(stores[1])
    assert (ours["activations"]["done"].values == DONE).all()
    for group in ("activations", "attention"):
        for name in theirs[group].data_vars:
            np.testing.assert_array_equal(ours[group][name].values, theirs[group][name].values, err_msg=name)


def _ablate(model, manifest, out: str) -> list[str]:
    return ["ablate", "--model", str(model), "--data", str(manifest), "--out", out, "--ks", "1,10,25"] + [
        "--block",
        str(BLOCK),
        "--batch-size",
        "8",
        "--no-progress",
    ]


def test_ablation_through_the_cluster_equals_a_single_process_run_and_so_does_its_analysis(
    cluster, s3, toy_models, manifest, tmp_path
):
    url, local = f"s3://{S3_BUCKET}/cluster/ablate.zarr", str(tmp_path / "ablate.zarr")
    remote = ["--scheduler", cluster.scheduler.address, "--storage-options", json.dumps(s3)]
    with get_task_stream(cluster) as stream:
        assert main([*_ablate(toy_models["gqa"], manifest, url), *remote]) == 0
    assert len({t["key"] for t in stream.data if "vislens-ablate" in str(t["key"])}) == 2
    assert main(_ablate(toy_models["gqa"], manifest, local)) == 0
    ours, theirs = open_store(url, s3)["ablation"].to_dataset(), open_store(local)["ablation"].to_dataset()
    assert (ours["done"].values == DONE).all()
    for name in theirs.variables:
        np.testing.assert_array_equal(ours[name].values, theirs[name].values, err_msg=name)
    assert main(["analyze", "ablation", url, *remote, "--out", str(tmp_path / "cluster")]) == 0
    assert main(["analyze", "ablation", local, "--out", str(tmp_path / "local")]) == 0
    mine, reference = _tables(tmp_path / "cluster"), _tables(tmp_path / "local")
    assert mine.keys() == reference.keys() and mine
    for name, table in reference.items():
        pd.testing.assert_frame_equal(mine[name], table, obj=name, check_exact=True)


def test_a_cluster_that_cannot_do_the_work_is_named_before_any_work(cluster, tmp_path):
    from vislens.cluster import check_workers
    from vislens.cluster import cluster as connect
    from vislens.errors import ClusterError

    with pytest.raises(ClusterError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9.*dask scheduler"):
        with connect("tcp://127.0.0.1:9", timeout_s=2):
            pass
    with pytest.raises(ClusterError, match="--scheduler .* or --workers .*, not both"):
        with connect(cluster.scheduler.address, 2):
            pass
    missing = StoreLocation(str(tmp_path / "only-here.zarr"))
    with pytest.raises(ClusterError, match="worker tcp://.* cannot read .*only-here.zarr.*every worker mounts"):
        check_workers(cluster, [missing])
    assert len(check_workers(cluster)) == 2


def test_local_workers_decode_on_their_share_of_the_cores(monkeypatch):
    """--workers N: each worker's zarr codec pool gets cores // N threads (what bench/scale.py measured)."""
    from vislens.cluster import cluster as connect
    from vislens.cluster import local_worker_env

    monkeypatch.delenv("ZARR_THREADING__MAX_WORKERS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert local_worker_env(2) == {"ZARR_THREADING__MAX_WORKERS": str(max(1, cores // 2))}
    with connect(workers=2) as client:
        threads = client.run(lambda: zarr.config.get("threading.max_workers"))
    assert sorted(threads.values()) == [max(1, cores // 2)] * 2
    monkeypatch.setenv("ZARR_THREADING__MAX_WORKERS", "3")
    assert local_worker_env(2) == {}  # the user's choice is kept
