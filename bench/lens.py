"""Benchmark of vislens.kernels.lens_topk on the CPU, per layer, at LLaVA-1.5 7B and 13B shapes.

One layer of one sample: 576 image-token rows, hidden 4096 (7B) or 5120 (13B), vocabulary 32000,
final RMSNorm, k = 1 and 10. Baseline: torch fp32 `(norm(x) @ W.T).topk(k)` with W already in
fp32 (what the analysis did). Measured: the exact CPU path (backend="numba", unembedding prepared
once), its speed-up, whether its ids equal the baseline's and the exact reference's, how its
certificate went (candidates per row re-scored in fp32, rows that fell back to an fp32 screen),
and the extra peak memory of one call of each (fresh process, after all timings).

No checkpoints here, so the inputs are synthetic, made to look like these models' (see
`unembedding` and `hidden_states`): an fp16 unembedding with row norms spread like LLaMA's, and
pre-norm hidden rows = Gaussian noise + a direction made of a few vocabulary rows (Zipf weights)
at a strength that sets how peaked the logits are, + 4 outlier channels 20x the rest:
  early  - no signal: flat logits, the top logit ~6 standard deviations above the mean (the
           spread of row norms and the outliers widen the tail of pure noise);
  middle - some signal: the top logit ~8 sd above the mean (the 10th: ~4.7 sd);
  late   - strong signal: the top logit ~20 sd above the mean.
The measured top-logit z-scores are in the notes. The 2-core machine is shared: besides wall
time (the median, as everywhere) this reports the process CPU time of each call, which other
processes disturb less, and speed-ups from both.

    python bench/lens.py [--quick] [--models 7b,13b] [--repeats N] [--threads N] [--out PATH]

Screen paths: the middle layer once per int8 GEMM path of the exact CPU path (vislens.kernels.
lens_topk.screen: oneDNN with 8-bit activations where the CPU sums u8 x s8 in 32 bits, oneDNN with
7-bit activations, torch._int_mm, and the fp32 screen), each forced by name, against the fp32 GEMM
+ topk on the same rows; the int8 GEMM alone too. A path whose probe fails on this CPU is named
with the reason. torch._int_mm is timed on 64 rows only where it runs a reference loop.

Also: the middle layer through Dask (a LocalCluster of 1 and of 2 worker processes, the
unembedding scattered once per worker), and the extra wall time of `vislens extract --lens-topk 5`
on the embedded toy LLaVA.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from _common import Contention, Row, Timing, machine, parser, peak_memory, print_table, write_json
from _common import version as vislens_version

from vislens.errors import BackendUnavailableError
from vislens.kernels import LensNorm, lens_topk, prepare_unembedding
from vislens.kernels.lens_topk import numba as cpu
from vislens.kernels.lens_topk import reference, screen
from vislens.kernels.lens_topk.reference import apply_norm

MB = 1e6
KINDS = ("early", "middle", "late")
_STRENGTH = {"early": 0.0, "middle": 0.2, "late": 0.6}  # signal norm / noise norm
_OUTLIERS = [100, 1415, 2533, 3000]  # channels 20x the rest (every model here has d > 3000)
_REFERENCE_ROWS = 16  # rows checked against the exact (slow) reference per case


@dataclass(frozen=True)
class Model:
    name: str
    hidden: int
    vocab: int = 32000
    rows: int = 576


MODELS = {"7b": Model("LLaVA-1.5-7B", 4096), "13b": Model("LLaVA-1.5-13B", 5120)}
QUICK = {"7b": Model("7B, quick", 4096, vocab=4000, rows=64), "13b": Model("13B, quick", 5120, vocab=4000, rows=64)}


def unembedding(m: Model, seed: int = 0) -> torch.Tensor:
    """(vocab, hidden) fp16: Gaussian rows, row norms spread (log-normal, sd 0.3) around 1."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(m.vocab, m.hidden, generator=g)
    scale = torch.exp(0.3 * torch.randn(m.vocab, 1, generator=g)) / m.hidden**0.5
    return (rows * scale).half()


def final_norm(m: Model, seed: int = 1) -> LensNorm:
    g = torch.Generator().manual_seed(seed)
    return LensNorm("rms", 1e-6, 1 + 0.1 * torch.randn(m.hidden, generator=g))


def hidden_states(m: Model, kind: str, w: torch.Tensor, seed: int = 2) -> torch.Tensor:
    """(rows, hidden) fp16 pre-norm rows of one layer kind (module docstring)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(m.rows, m.hidden, generator=g)
    tokens = torch.randint(0, m.vocab, (m.rows, 8), generator=g)
    directions = w[tokens].float()
    directions /= directions.norm(dim=-1, keepdim=True)
    signal = (directions / torch.arange(1, 9).float()[None, :, None]).sum(1)
    signal *= m.hidden**0.5 / signal.norm(dim=-1, keepdim=True)
    h = noise + _STRENGTH[kind] * signal
    h[:, _OUTLIERS] *= 20
    return h.half()


def _timed(fn: Callable[[], object], repeats: int) -> tuple[Timing, Timing]:
    """(wall, process CPU) seconds per call: medians and 20th/80th percentiles after one warm-up."""
    fn()
    wall, cpu_time = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu_time.append(time.process_time() - c0)

    def timing(xs: list[float]) -> Timing:
        p20, p80 = np.percentile(xs, [20, 80])
        return Timing(statistics.median(xs), float(p20), float(p80))

    return timing(wall), timing(cpu_time)


def _speedup(base: Timing, t: Timing) -> Timing:
    return Timing(base.median / t.median, base.p20 / t.p80, base.p80 / t.p20)


def _baseline(x: torch.Tensor, w32: torch.Tensor, k: int, norm: LensNorm) -> Callable[[], tuple]:
    return lambda: (apply_norm(x.float(), norm) @ w32.T).topk(k, dim=1)


def _setup(model: Model, kind: str, k: int, backend: str):
    """(warm, run) for peak_memory: one call on a few rows, then on the layer."""
    w = unembedding(model)
    x, norm = hidden_states(model, kind, w), final_norm(model)
    if backend == "torch fp32 GEMM + topk":
        w32 = w.float()
        return _baseline(x[:4], w32, k, norm), _baseline(x, w32, k, norm)
    prepared = prepare_unembedding(w)
    return (
        lambda: lens_topk(x[:4], prepared, k, norm=norm, backend="numba"),
        lambda: lens_topk(x, prepared, k, norm=norm, backend="numba"),
    )


def _dask_layer(client, future_w, x: torch.Tensor, k: int, norm: LensNorm, parts: int) -> None:
    """One layer's rows split into ``parts`` tasks; the prepared unembedding is a broadcast future."""
    chunks = torch.chunk(x, parts)
    futures = [client.submit(lens_topk, c, future_w, k, norm=norm, backend="numba", pure=False) for c in chunks]
    client.gather(futures)


def dask_rows(model: Model, args) -> list[Row]:
    """The middle layer through Dask: a LocalCluster of 1 and of 2 worker processes (one thread each),
    the unembedding scattered once to every worker (its int8 form derived there once), rows split
    in two tasks; against the same call in this process on one thread."""
    from distributed import Client, LocalCluster

    w = unembedding(model)
    x, norm = hidden_states(model, "middle", w), final_norm(model)
    k, repeats = 1, args.repeats or (2 if args.quick else 5)
    shape = f"x ({model.rows}, {model.hidden}) fp16, W ({model.vocab}, {model.hidden}) fp16"
    rows, where, label = [], machine(), vislens_version()
    for workers in (1, 2):
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
            with Client(cluster) as client:
                client.run(lambda: (torch.set_num_threads(1), __import__("numba").set_num_threads(1)))
                future_w = client.scatter(prepare_unembedding(w), broadcast=True)
                wall, _ = _timed(lambda: _dask_layer(client, future_w, x, k, norm, 2), repeats)
        rows.append(
            Row(
                f"dask lens_topk {model.name} middle k=1",
                f"LocalCluster {workers} worker(s)",
                "time",
                "s",
                shape,
                wall.median,
                wall.p20,
                wall.p80,
                where,
                label,
            )
        )
    return rows


def path_rows(model: Model, args, notes: list[str]) -> list[Row]:
    """The middle layer, k = 1 and 10, on every screen path this CPU can run exactly (forced by
    name), against the fp32 GEMM + topk on the same rows; and each int8 GEMM alone."""
    w = unembedding(model)
    w32 = w.float()
    norm = final_norm(model)
    xn = apply_norm(hidden_states(model, "middle", w).float(), norm)
    repeats = args.repeats or (2 if args.quick else 5)
    rows, where, label = [], machine(), vislens_version()
    notes.append(f"auto screen path on this CPU ({screen.describe_cpu()}): {cpu.prepare(w).probes}")
    for name in screen.PATHS:
        try:
            prepared = cpu.prepare(w, gemm=name)
        except BackendUnavailableError as err:
            notes.append(f"screen path {name}: not run, {err}")
            continue
        x = xn
        if name == "int_mm":  # a reference loop on some CPUs: time a 64-row slice once first
            begin = time.process_time()
            torch._int_mm(torch.ones(64, model.hidden, dtype=torch.int8), prepared.packed[:4096].T)
            if time.process_time() - begin > 0.5:
                x = xn[:64]
                notes.append(f"screen path int_mm: a slow reference loop here, timed on {x.shape[0]} rows")
        shape = f"x ({x.shape[0]}, {model.hidden}) fp32 normed, W ({model.vocab}, {model.hidden}) fp16"
        reps = 1 if x.shape[0] < xn.shape[0] else repeats
        if name != "fp32":
            _, gemm_cpu = _timed(lambda: cpu._screen(x, prepared), reps)
            rows.append(
                Row(
                    f"screen {model.name} middle",
                    name,
                    "int8 GEMM alone (CPU)",
                    "s",
                    shape,
                    gemm_cpu.median,
                    gemm_cpu.p20,
                    gemm_cpu.p80,
                    where,
                    label,
                )
            )
        for k in (1, 10):
            operation = f"screen {model.name} middle k={k}"
            _, base_cpu = _timed(lambda: (x @ w32.T).topk(k, dim=1), reps)
            _, cpu_time = _timed(lambda: cpu.topk(x, prepared, k), reps)
            rows.append(
                Row(
                    operation,
                    "torch fp32 GEMM + topk",
                    "CPU time",
                    "s",
                    shape,
                    base_cpu.median,
                    base_cpu.p20,
                    base_cpu.p80,
                    where,
                    label,
                )
            )
            rows.append(
                Row(
                    operation,
                    f"numba, screen {name}",
                    "CPU time",
                    "s",
                    shape,
                    cpu_time.median,
                    cpu_time.p20,
                    cpu_time.p80,
                    where,
                    label,
                )
            )
            speed = _speedup(base_cpu, cpu_time)
            rows.append(
                Row(
                    operation,
                    f"numba, screen {name}",
                    "speedup vs fp32 GEMM (CPU)",
                    "x",
                    shape,
                    speed.median,
                    speed.p20,
                    speed.p80,
                    where,
                    label,
                )
            )
    return rows


def extraction_rows(args) -> list[Row]:
    """The extra wall time of `vislens extract --lens-topk 5` on the toy LLaVA (36 image tokens,
    6 layers): the same extraction with and without it, interleaved, per sample."""
    import shutil
    import tempfile
    from pathlib import Path

    from vislens.extract import ExtractConfig, extract
    from vislens.toys import toy_model_path
    from vislens.toys.shapes import make_shapes

    root = Path(tempfile.mkdtemp(prefix="vislens-bench-lens-"))
    n = 8 if args.quick else 32
    try:
        manifest = make_shapes(root / "data", n=n, start=0)
        model = str(toy_model_path())
        times: dict[str, list[float]] = {"without": [], "with --lens-topk 5": []}
        for r in range(1 if args.quick else 3):
            for name in times:
                compute = ("lens",) if name != "without" else ()
                config = ExtractConfig(
                    model=model,
                    data=str(manifest),
                    out=str(root / f"{r}-{len(name)}.zarr"),
                    attention="none",
                    compute=compute,
                    progress=False,
                )
                begin = time.perf_counter()
                extract(config)
                times[name].append((time.perf_counter() - begin) / n)
        rows, where, label = [], machine(), vislens_version()
        for name, values in times.items():
            p20, p80 = np.percentile(values, [20, 80])
            rows.append(
                Row(
                    "extract toy LLaVA",
                    name,
                    "wall per sample",
                    "s",
                    f"{n} samples",
                    statistics.median(values),
                    float(p20),
                    float(p80),
                    where,
                    label,
                )
            )
        ratio = statistics.median(times["with --lens-topk 5"]) / statistics.median(times["without"])
        rows.append(
            Row(
                "extract toy LLaVA",
                "with --lens-topk 5",
                "wall vs without",
                "x",
                f"{n} samples",
                ratio,
                ratio,
                ratio,
                where,
                label,
            )
        )
        return rows
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--models", default="7b,13b", help="comma-separated: 7b, 13b")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 7, quick 2)")
    p.add_argument("--threads", type=int, default=None, help="torch and numba threads (default: all cores)")
    p.add_argument("--only-paths", action="store_true", help="only the screen paths' section")
    args = p.parse_args()
    if args.threads:
        import numba

        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    models = [(QUICK if args.quick else MODELS)[name] for name in args.models.split(",")]
    repeats = args.repeats or (2 if args.quick else 7)
    rows: list[Row] = []
    notes: list[str] = []
    where, label = machine(), vislens_version()
    contention = Contention()
    measured: list[tuple[Model, str, int, str, str]] = []

    def add(operation: str, backend: str, metric: str, unit: str, shape: str, t: Timing) -> None:
        rows.append(Row(operation, backend, metric, unit, shape, t.median, t.p20, t.p80, where, label))

    def one(value: float) -> Timing:
        return Timing(value, value, value)

    if args.only_paths:
        for model in models:
            rows += path_rows(model, args, notes)
        print_table(rows)
        for note in notes:
            print(note)
        print("wrote", write_json("lens", rows, notes, args.out))
        return
    for model in models:
        rows += path_rows(model, args, notes)
        w = unembedding(model)
        w32 = w.float()
        norm = final_norm(model)
        begin_wall, begin_cpu = time.perf_counter(), time.process_time()
        prepared = prepare_unembedding(w)
        lens_topk(torch.zeros(1, model.hidden), prepared, 1, backend="numba")  # prepares, compiles
        shape = f"x ({model.rows}, {model.hidden}) fp16, W ({model.vocab}, {model.hidden}) fp16"
        add(
            f"lens_topk {model.name}",
            "numba",
            "prepare once (wall, incl. JIT)",
            "s",
            shape,
            one(time.perf_counter() - begin_wall),
        )
        add(f"lens_topk {model.name}", "numba", "prepare once (CPU)", "s", shape, one(time.process_time() - begin_cpu))
        for kind in KINDS:
            x = hidden_states(model, kind, w)
            logits = apply_norm(x.float(), norm) @ w32.T
            z = ((logits.max(1).values - logits.mean(1)) / logits.std(1)).mean().item()
            notes.append(f"{model.name} {kind}: top logit {z:.1f} sd above the mean (row average)")
            del logits
            for k in (1, 10):
                operation = f"lens_topk {model.name} {kind} k={k}"
                base_wall, base_cpu = _timed(_baseline(x, w32, k, norm), repeats)
                add(operation, "torch fp32 GEMM + topk", "time", "s", shape, base_wall)
                add(operation, "torch fp32 GEMM + topk", "CPU time", "s", shape, base_cpu)
                wall, cpu_time = _timed(lambda: lens_topk(x, prepared, k, norm=norm, backend="numba"), repeats)
                add(operation, "numba", "time", "s", shape, wall)
                add(operation, "numba", "CPU time", "s", shape, cpu_time)
                add(operation, "numba", "speedup vs fp32 GEMM (wall)", "x", shape, _speedup(base_wall, wall))
                add(operation, "numba", "speedup vs fp32 GEMM (CPU)", "x", shape, _speedup(base_cpu, cpu_time))
                xn = apply_norm(x.float(), norm)
                values, ids, stats = cpu.topk(xn, prepared.derived("numba", cpu.prepare), k)
                base_ids = (xn @ w32.T).topk(k, dim=1).indices
                add(
                    operation,
                    "numba",
                    "rows with ids != fp32 GEMM's",
                    "rows",
                    shape,
                    one(float((ids != base_ids).any(1).sum())),
                )
                want = reference.lens_topk(x[:_REFERENCE_ROWS], w, k, norm)
                same = torch.equal(want[1], ids[:_REFERENCE_ROWS]) and torch.equal(want[0], values[:_REFERENCE_ROWS])
                add(
                    operation,
                    "numba",
                    f"equal to the exact reference (first {_REFERENCE_ROWS} rows)",
                    "bool",
                    shape,
                    one(float(same)),
                )
                c = stats.candidates
                add(
                    operation,
                    "numba",
                    "candidates per row",
                    "ids",
                    shape,
                    Timing(float(np.median(c)), *map(float, np.percentile(c, [20, 80]))),
                )
                add(operation, "numba", "candidates per row, max", "ids", shape, one(float(c.max())))
                add(
                    operation,
                    "numba",
                    "rows falling back to the fp32 screen",
                    "%",
                    shape,
                    one(100 * stats.fallback.mean()),
                )
                add(operation, "numba", "pairs summed with math.fsum", "pairs", shape, one(float(stats.exact_sums)))
                measured += [(model, kind, k, "torch fp32 GEMM + topk", shape), (model, kind, k, "numba", shape)]
        rows += dask_rows(model, args)
    rows += extraction_rows(args)
    notes.append(contention.note())
    for model, kind, k, backend, shape in measured:
        if kind == "middle":  # the memory of a call does not depend on the data much
            peak = peak_memory(functools.partial(_setup, model, kind, k, backend)) / MB
            add(f"lens_topk {model.name} {kind} k={k}", backend, "peak memory", "MB", shape, Timing(peak, peak, peak))
    operations = list(dict.fromkeys(r.operation for r in rows))
    rows.sort(key=lambda r: operations.index(r.operation))
    print_table(rows)
    notes += _targets(rows, args.quick)
    for note in notes:
        print(note)
    print("wrote", write_json("lens", rows, notes, args.out))


def _targets(rows: list[Row], quick: bool) -> list[str]:
    scale = " [--quick shapes: not the targets' shapes]" if quick else ""
    out = []
    for r in rows:
        if r.metric == "speedup vs fp32 GEMM (CPU)":
            out.append(
                f"target: {r.operation} >= 3x faster than fp32 GEMM + topk (CPU time): {'met' if r.median >= 3 else 'NOT met'} ({r.median:.2f}x){scale}"
            )
        if r.metric.startswith("equal to the exact reference") and r.median != 1:
            out.append(f"target: {r.operation} ids and values equal the exact reference: NOT met{scale}")
    return out


if __name__ == "__main__":
    main()
