"""Scale-out of the analyses: a Dask LocalCluster of 1 vs 2 worker processes (one thread each).

A store of LLaVA-1.5-like layout (33 layers, 600 tokens of which 576 image tokens) is written
with random states (bench/analyze.py's `build_store`), with a width D and vocabulary V chosen so
that one sample is a task of a good fraction of a second: cosine reads D=2048 states (80 MB per
sample, fp16), the CPU logit lens decodes every image token at every layer through a D=512 x
V=4096 unembedding. Measured for each analysis and worker count, after a warm-up run (imports,
lens read): the time of the whole analysis (median of the repeats), samples per second, the
speed-up of 2 workers over 1, bytes each worker read (its rchar) and fetched from other workers,
the lens reads per worker; then the scheduler's cost per task (empty tasks of the same count)
against the compute time per task, at the chunk size the analyses use (one stored sample).

    python bench/scale.py [--quick] [--samples N] [--repeats R] [--out bench/results/scale.json]
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import Contention, Row, machine, parser, print_table, version, write_json  # noqa: E402
from analyze import build_store  # noqa: E402

from vislens.analyze import cosine_per_sample, logit_lens_topk  # noqa: E402
from vislens.analyze import lens as lens_module  # noqa: E402
from vislens.store import open_store  # noqa: E402


def _rchar() -> int:
    """Bytes this process has read through read() calls (store files, page cache or not)."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines() if line)
    return int(fields["rchar"])


def _fetched(dask_worker) -> int:
    """Bytes this worker fetched from other workers since the log was last cleared."""
    total = sum(t["total"] for t in dask_worker.transfer_incoming_log)
    dask_worker.transfer_incoming_log.clear()
    return total


def _noop(block: np.ndarray) -> np.ndarray:
    return block


def _first_value(hidden: np.ndarray) -> np.ndarray:
    """A read-only 'analysis': the hidden states are read and decoded, one value kept per sample."""
    return hidden[:, :1, 0, 0].astype(np.float32)


def _read_only(tree):
    """The reading of `cosine`'s tasks alone: one task per stored sample, as `map_samples` makes them."""
    from vislens.analyze.common import map_samples

    acts = tree["activations"].to_dataset()
    return map_samples(
        _first_value,
        [acts["hidden"]],
        [["layer", "token", "d_model"]],
        ["one"],
        dtype=np.float32,
        output_sizes={"one": 1},
    )


def measure(clients: dict[int, object], analysis, repeats: int) -> dict[int, dict]:
    """Wall time of ``analysis().compute()`` on each client (by worker count), the clients taking
    turns repeat by repeat (so that a change in the machine's load hits both alike), with each
    worker's bytes read and fetched from other workers and its lens reads."""
    times: dict[int, list[float]] = {n: [] for n in clients}
    read0, cpu0 = {}, {}
    for n, client in clients.items():
        with dask.config.set(scheduler=client):
            analysis().compute()  # warm-up: imports, numba's cache, the lens read once per worker
        client.run(_fetched)
        read0[n] = client.run(_rchar)
        cpu0[n] = client.run(time.process_time)
    for _ in range(repeats):
        for n, client in clients.items():
            with dask.config.set(scheduler=client):
                start = time.perf_counter()
                analysis().compute()
                times[n].append(time.perf_counter() - start)
    out = {}
    for n, client in clients.items():
        read1, fetched, cpu1 = client.run(_rchar), client.run(_fetched), client.run(time.process_time)
        out[n] = {
            "seconds": statistics.median(times[n]),
            "p20": float(np.percentile(times[n], 20)),
            "p80": float(np.percentile(times[n], 80)),
            "times": times[n],
            "read": {w: (read1[w] - read0[n][w]) / repeats for w in read1},
            "fetched": {w: fetched[w] / repeats for w in fetched},
            "lens_reads": client.run(lens_module.reads),
            "cpu": sum(cpu1[w] - cpu0[n][w] for w in cpu1) / repeats,
        }
    return out


def task_overhead(client, n_tasks: int, repeats: int) -> float:
    """Seconds the scheduler and workers spend per task on empty tasks (n_tasks of them)."""
    with dask.config.set(scheduler=client):
        empty = lambda: da.map_blocks(_noop, da.zeros(n_tasks, chunks=1), dtype=float)  # noqa: E731
        empty().compute()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            empty().compute()
            times.append(time.perf_counter() - start)
    return statistics.median(times) / n_tasks


def s3_requests(samples: int) -> dict[str, dict[str, float]]:
    """S3 requests per sample (by API call) of an extraction and of a cosine analysis, on a moto
    S3 server on loopback, toy model (the counts do not depend on the sizes of the arrays).

    Marginal counts: a run of ``samples`` minus a run of ``samples // 4``, over the samples
    between, so that the store's creation and the metadata reads of opening it are left out.
    """
    import collections
    import functools

    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    from vislens.analyze import cosine
    from vislens.extract import ExtractConfig, extract
    from vislens.toys import toy_model_path
    from vislens.toys.shapes import make_shapes

    counts: collections.Counter = collections.Counter()
    call = s3fs.S3FileSystem._call_s3

    @functools.wraps(call)
    async def counted(self, method, *args, **kwargs):
        counts[method] += 1
        return await call(self, method, *args, **kwargs)

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    few = max(1, samples // 4)
    try:
        endpoint = f"http://127.0.0.1:{server._server.server_port}"
        boto3.client(
            "s3", endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1"
        ).create_bucket(Bucket="bench")
        options = {"key": "x", "secret": "x", "endpoint_url": endpoint, "client_kwargs": {"region_name": "us-east-1"}}
        totals: dict[tuple[str, int], collections.Counter] = {}
        with tempfile.TemporaryDirectory() as tmp:
            data = make_shapes(Path(tmp), n=samples, start=0)
            s3fs.S3FileSystem._call_s3 = counted
            try:
                for n in (few, samples):
                    url = f"s3://bench/s{n}.zarr"
                    config = ExtractConfig(
                        model=str(toy_model_path()),
                        data=str(data),
                        out=url,
                        limit=n,
                        progress=False,
                        storage_options=options,
                    )
                    for phase, run in (
                        ("extract", lambda: extract(config)),
                        ("cosine", lambda: cosine(open_store(url, options))),  # noqa: B023 - run at once
                    ):
                        counts.clear()
                        with dask.config.set(scheduler="synchronous"):
                            run()
                        totals[phase, n] = collections.Counter(counts)
            finally:
                s3fs.S3FileSystem._call_s3 = call
    finally:
        server.stop()
    return {
        phase: {
            method: (totals[phase, samples][method] - totals[phase, few][method]) / (samples - few)
            for method in sorted(totals[phase, samples])
        }
        for phase in ("extract", "cosine")
    }


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--zarr-threads", action="store_true", help="workers keep zarr's default codec thread pool")
    args = p.parse_args()
    from distributed import Client, LocalCluster

    samples = args.samples or (4 if args.quick else 16)
    layers, tokens, n_image = (5, 40, 32) if args.quick else (33, 600, 576)
    shapes = {
        "read": (64, 256) if args.quick else (2048, 256),
        "cosine": (64, 256) if args.quick else (2048, 256),
        "logit_lens": (64, 512) if args.quick else (512, 4096),
    }
    repeats = 1 if args.quick else args.repeats
    contention = Contention()
    rows: list[Row] = []
    notes: list[str] = []

    def row(operation: str, backend: str, metric: str, unit: str, shape: str, value: float, lo=None, hi=None):
        rows.append(
            Row(
                operation,
                backend,
                metric,
                unit,
                shape,
                value,
                value if lo is None else lo,
                value if hi is None else hi,
                machine(),
                version(),
            )
        )

    with tempfile.TemporaryDirectory() as tmp:
        stores = {}
        for name in ("cosine", "logit_lens"):
            hidden, vocab = shapes[name]
            stores[name] = build_store(Path(tmp) / f"{name}.zarr", samples, layers, tokens, n_image, hidden, vocab)
        analyses = {
            "read": lambda: _read_only(open_store(stores["cosine"])),
            "cosine": lambda: cosine_per_sample(open_store(stores["cosine"]), text_tokens="all")["inter_modal"],
            "logit_lens": lambda: logit_lens_topk(open_store(stores["logit_lens"]), 1),
        }
        timing: dict[tuple[str, int], dict] = {}
        clusters = {
            n: LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",
                silence_logs=logging.ERROR,
                # one core per worker process: numba's kernels, and zarr's codec threads (by default
                # zarr decodes a sample's 33 inner chunks on a thread pool, so that one worker alone
                # already keeps more than one core busy); --zarr-threads keeps zarr's default
                env={"NUMBA_NUM_THREADS": "1"} | ({} if args.zarr_threads else {"ZARR_THREADING__MAX_WORKERS": "1"}),
            )
            for n in (1, 2)
        }
        clients = {n: Client(cluster, set_as_default=False) for n, cluster in clusters.items()}
        try:
            for name, analysis in analyses.items():
                hidden, vocab = shapes[name]
                shape = f"{samples} samples x {layers} layers x {tokens} tokens, D={hidden}" + (
                    f", V={vocab}" if name == "logit_lens" else ""
                )
                for workers, m in measure(clients, analysis, repeats).items():
                    timing[name, workers] = m | {"shape": shape}
                    label = f"LocalCluster {workers} worker{'s' * (workers > 1)}"
                    row(name, label, "time", "s", shape, m["seconds"], m["p20"], m["p80"])
                    row(name, label, "throughput", "samples/s", shape, samples / m["seconds"])
                    for i, worker in enumerate(sorted(m["read"])):
                        row(name, f"{label}, worker {i}", "read", "MB", shape, m["read"][worker] / 1e6)
                        fetched = m["fetched"][worker] / 1e6
                        row(name, f"{label}, worker {i}", "fetched from workers", "MB", shape, fetched)
                    if name == "logit_lens":
                        notes.append(f"{label}: lens reads per worker process {sorted(m['lens_reads'].values())}")
            per_task = task_overhead(clients[2], samples * 8, repeats)
        finally:
            for n in clients:
                clients[n].close()
                clusters[n].close()
        row("empty tasks", "LocalCluster 2 workers", "overhead per task", "ms", f"{samples * 8} tasks", per_task * 1e3)
        for name in analyses:
            compute = timing[name, 2]["seconds"] * 2 / samples  # worker-seconds per one-sample task
            notes.append(
                f"{name}: one task per sample takes {compute * 1e3:.0f} ms of a worker; the scheduler's "
                f"cost per task is {per_task * 1e3:.1f} ms ({100 * per_task / compute:.1f}% of it)"
            )
    requests = s3_requests(8 if args.quick else 64)
    for phase, by_method in requests.items():
        for method, per_sample in by_method.items():
            row(f"S3 requests ({phase})", method, "requests per sample", "1", "toy store, moto on loopback", per_sample)
        notes.append(f"S3 requests per sample, {phase}: {sum(by_method.values()):.1f} ({by_method})")
    print_table(rows)
    read_mb = samples * layers * tokens * shapes["read"][0] * 2 / 1e6
    for workers in (1, 2):
        notes.append(
            f"reading and decoding alone, {workers} worker(s): {read_mb / timing['read', workers]['seconds']:.0f} MB/s "
            f"of fp16 hidden states (page cache; Blosc-zstd level 1)"
        )
    for name in analyses:
        one, two = timing[name, 1]["seconds"], timing[name, 2]["seconds"]
        paired = statistics.median(a / b for a, b in zip(timing[name, 1]["times"], timing[name, 2]["times"]))
        hidden_bytes = samples * layers * tokens * shapes[name][0] * 2
        moved = sum(timing[name, 2]["fetched"].values())
        goal = " (goal 1.7x)" if name != "read" else ""
        cpu1, cpu2 = timing[name, 1]["cpu"] / samples, timing[name, 2]["cpu"] / samples
        row(name, "LocalCluster 1 worker", "CPU time per sample", "s", timing[name, 1]["shape"], cpu1)
        row(name, "LocalCluster 2 workers", "CPU time per sample", "s", timing[name, 2]["shape"], cpu2)
        notes.append(
            f"{name}: CPU time per sample {cpu1:.2f} s with 1 worker, {cpu2:.2f} s with 2 (contention between the "
            f"workers included): on 2 free cores 2 workers would run {2 * cpu1 / cpu2:.2f}x one worker"
        )
        notes.append(
            f"{name}: 2 workers {one / two:.2f}x one worker{goal}, {paired:.2f}x as the median of back-to-back "
            f"pairs; between workers moved {moved / 1e6:.2f} MB of {hidden_bytes / 1e6:.0f} MB of hidden states read"
        )
    notes.append(contention.note())
    notes.append(f"CPUs usable: {len(os.sched_getaffinity(0))}; the store is in the page cache after its first read")
    notes.append(
        "workers: one thread each, numba on one thread, zarr codecs "
        + ("on its default thread pool" if args.zarr_threads else "on one thread (ZARR_THREADING__MAX_WORKERS=1)")
    )
    for note in notes:
        print(note)
    print(f"wrote {write_json('scale', rows, notes, args.out)}")


if __name__ == "__main__":
    main()
