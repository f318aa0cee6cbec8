"""Writing and reading hidden states: the vislens store against raw files, safetensors, torch.save and HDF5.

N samples of LLaVA-1.5-7B shape (33 layers x 600 tokens x 4096 hidden, float16, 162 MB each) are
written by every candidate and read back cold. MB = 1e6 bytes of logical float16 data.

- write MB/s: every candidate's data is durable when the clock stops. The baselines fsync each file
  and their folder; vislens is timed as `vislens extract` writes (`StoreWriter.write_sample(i,
  {"hidden": x})` per sample; creating the store with `prepare_store` is timed apart, as
  ``create``) with nothing added: its local store fsyncs every file and folder before `set`
  returns. To check that no candidate left data in the page cache, every timed write is followed
  by an untimed `os.sync()`, reported as ``sync after``: ~0 ms when the write was already durable
  (it is machine-wide, so other processes' writes would show up too: see the contention note).
  Writes of all candidates are interleaved, repetition by repetition.
- bytes on disk (file sizes of the candidate's folder) and the lossless ratio (logical / on disk).
- read MB/s, cold: (1) one sample, all layers; (2) one layer across all samples. Before every timed
  read the page cache is dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`, root only) or, where
  that is refused or with ``--evict fadvise``, every file of the candidate is evicted with
  posix_fadvise(POSIX_FADV_DONTNEED). Stores and HDF5 files are opened before the clock starts;
  per-sample files are opened inside, and so is the store given by path to
  `vislens.store.read_layer` (its version and codec checks are timed). vislens is also read through
  `open_store(...)["activations"]["hidden"]` (xarray/dask) and plain zarr. Every read is checked bit
  for bit against what was written.
- vislens at Blosc zstd clevel 1 (the default), 3 and 5, all in 256 KiB Blosc blocks, as
  `StoreSpec(clevel=...)` makes them; the default also in the extraction's pattern (one writer
  thread overlapping the generation of the next sample) and with ``--keep-bits N`` (size and max
  relative error).

Generated data (`Profile`, `make_sample` in bench/_store_formats.py), modelled on Llama-2-7B
residual streams: layer l holds Gaussian states whose std grows geometrically with depth from 0.02
(embeddings) to ~3 (last decoder layer), 1.5 for the final-normed last layer; a per-dimension
scale (log-normal, sigma 0.3) with 6 outlier dimensions 10-40x larger from layer 1 on; a
per-dimension mean shared by all tokens (0.3 of the dimension's std); a per-token log-normal scale
(sigma 0.25); and "massive activations" (hundreds) in two outlier dimensions of the first token
from layer 2 on. The profile is seeded and shared by samples (it belongs to the model), the noise
differs per sample. The ratio on i.i.d. N(0, 1) is also shown.

    python bench/store.py [--samples N] [--quick] [--out bench/results/store.json] [--dir TMPDIR]
                          [--evict drop_caches|fadvise]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import Contention, Row, Timing, machine, parser, print_table, rate, version, write_json  # noqa: E402
from _store_formats import (  # noqa: E402
    HDF5,
    Candidate,
    Raw,
    Reader,
    Safetensors,
    TorchSave,
    Vislens,
    drop_cache,
    folder_bytes,
    iid_sample,
    make_profile,
    make_sample,
)

from vislens.store import StoreSpec  # noqa: E402

FULL_SHAPE, QUICK_SHAPE = (33, 600, 4096), (5, 64, 256)
DEFAULT_CLEVEL = StoreSpec.clevel
CLEVELS = (DEFAULT_CLEVEL, 3, 5)
KEEP_BITS = (10, 7, 5, 3)
H5_CHUNKS = "(1, 1, token, hidden): one (sample, layer) per chunk, as vislens"


@dataclass
class Bench:
    """Settings and results of one run."""

    data: list[np.ndarray]
    shape: tuple[int, int, int]
    repeats: int
    read_repeats: int
    shape_label: str
    rows: list[Row]
    evict: str = "drop_caches"
    drop_method: str = ""

    @property
    def logical_mb(self) -> float:
        return sum(x.nbytes for x in self.data) / 1e6

    def add(self, operation: str, backend: str, metric: str, unit: str, t: Timing | float) -> None:
        t = t if isinstance(t, Timing) else Timing(t, t, t)
        self.rows.append(
            Row(operation, backend, metric, unit, self.shape_label, t.median, t.p20, t.p80, machine(), version())
        )


def percentiles(times: list[float]) -> Timing:
    p20, p80 = np.percentile(times, [20, 80])
    return Timing(float(np.median(times)), float(p20), float(p80))


def timed_write(cand: Candidate, write: Callable[[], None]) -> tuple[float, float, float]:
    """(seconds to create, seconds to write durably, seconds of an os.sync() right after) of one repetition."""
    begin = time.perf_counter()
    cand.reset()
    created = time.perf_counter() - begin
    os.sync()  # nothing left over from earlier candidates is flushed on this one's clock
    begin = time.perf_counter()
    write()
    written = time.perf_counter() - begin
    begin = time.perf_counter()
    os.sync()  # ~0 if write() left nothing dirty in the page cache
    return created, written, time.perf_counter() - begin


def measure_writes(bench: Bench, cands: list[Candidate]) -> None:
    """Write MB/s of every candidate, interleaved by repetition; creation and the sync after apart."""
    times: dict[str, list[tuple[float, float, float]]] = {c.name: [] for c in cands}
    for _ in range(bench.repeats):
        for cand in cands:
            times[cand.name].append(timed_write(cand, lambda cand=cand: cand.write(bench.data)))
    for cand in cands:
        created, written, synced = zip(*times[cand.name])
        bench.add("write", cand.name, "throughput (fsync'd)", "MB/s", rate(bench.logical_mb, percentiles(written)))
        bench.add("write", cand.name, "os.sync() after the write (untimed)", "s", percentiles(synced))
        if isinstance(cand, Vislens):
            bench.add("create", cand.name, "store creation (untimed in write)", "s", percentiles(created))


def cold_reads(bench: Bench, folder: Path, reader: Reader, pattern: str) -> Timing:
    """Seconds per cold read of one sample or one layer (a different one per repetition), checked."""
    handle = reader.open()
    n, layers = len(bench.data), bench.shape[0]
    times = []
    for r in range(bench.read_repeats):
        index = r % n if pattern == "sample" else (3 + 7 * r) % layers
        bench.drop_method = drop_cache(folder, bench.evict)
        begin = time.perf_counter()
        out = reader.sample(handle, index) if pattern == "sample" else reader.layer(handle, index)
        times.append(time.perf_counter() - begin)
        expect = bench.data[index] if pattern == "sample" else np.stack([x[index] for x in bench.data])
        if out.dtype != np.float16 or not np.array_equal(np.asarray(out).view(np.uint16), expect.view(np.uint16)):
            raise AssertionError(f"{reader.label} read back different {pattern} {index}")
    return percentiles(times)


def measure_reads(bench: Bench, cand: Candidate) -> None:
    """Size, ratio and both cold read patterns of a written candidate."""
    size = folder_bytes(cand.folder)
    bench.add("size", cand.name, "bytes on disk", "bytes", size)
    bench.add("size", cand.name, "lossless ratio", "x", bench.logical_mb * 1e6 / size)
    sample_mb, layer_mb = bench.data[0].nbytes / 1e6, bench.logical_mb / bench.shape[0]
    for reader in cand.readers():
        if reader.sample is not None:
            t = cold_reads(bench, cand.folder, reader, "sample")
            bench.add("read one sample", reader.label, "throughput (cold)", "MB/s", rate(sample_mb, t))
        t = cold_reads(bench, cand.folder, reader, "layer")
        bench.add("read one layer", reader.label, "throughput (cold)", "MB/s", rate(layer_mb, t))


def measure_background(bench: Bench, cand: Vislens, make: Callable[[int], np.ndarray]) -> None:
    """The extraction's writer thread overlapping generation; generation alone for reference."""
    gen, both = [], []
    for _ in range(bench.repeats):
        begin = time.perf_counter()
        for i in range(len(bench.data)):
            make(i)
        gen.append(time.perf_counter() - begin)
        both.append(timed_write(cand, lambda: cand.write_background(make))[1])
    label = f"numpy generator (beside {cand.name})"
    bench.add("generate", label, "throughput", "MB/s", rate(bench.logical_mb, percentiles(gen)))
    label = f"{cand.name} background writer"
    bench.add("generate + write", label, "throughput (fsync'd)", "MB/s", rate(bench.logical_mb, percentiles(both)))


def measure_keep_bits(bench: Bench, root: Path) -> list[tuple[int, float, float, float]]:
    """(bits, hidden bytes vs lossless, vs float16, max relative error over normal fp16) per N, default clevel."""
    out, base = [], None
    for bits in KEEP_BITS:
        cand = Vislens(root / f"keep{bits}", len(bench.data), bench.shape, DEFAULT_CLEVEL, None if bits == 10 else bits)
        seconds = timed_write(cand, lambda: cand.write(bench.data))[1]
        size = folder_bytes(cand.folder / "activations" / "hidden")
        base = base or size
        stored = next(r for r in cand.readers() if r.label.endswith(" zarr")).open()
        err = 0.0
        for i, x in enumerate(bench.data):
            ref, got = x.astype(np.float32), np.asarray(stored[i], dtype=np.float32)
            normal = np.abs(ref) >= np.float32(2.0**-14)
            err = max(err, float(np.max(np.abs(got[normal] - ref[normal]) / np.abs(ref[normal]))))
        label = f"vislens-c{DEFAULT_CLEVEL} keep_bits={bits}"
        bench.add("keep_bits", label, "hidden bytes vs lossless", "ratio", size / base)
        bench.add("keep_bits", label, "hidden bytes on disk", "bytes", size)
        bench.add("keep_bits", label, "max relative error (normal fp16)", "1", err)
        bench.add("keep_bits", label, "write throughput (fsync'd, 1 run)", "MB/s", bench.logical_mb / seconds)
        out.append((bits, size / base, size / (bench.logical_mb * 1e6), err))
        shutil.rmtree(cand.folder)
    return out


def measure_iid(bench: Bench, root: Path, rng: np.random.Generator, n: int) -> None:
    """Lossless ratio of the vislens store on i.i.d. N(0, 1) float16."""
    data = [iid_sample(rng, bench.shape) for _ in range(n)]
    for clevel in CLEVELS:
        cand = Vislens(root / "iid", n, bench.shape, clevel)
        timed_write(cand, lambda: cand.write(data))
        ratio = sum(x.nbytes for x in data) / folder_bytes(cand.folder / "activations" / "hidden")
        bench.add("size", f"{cand.name} iid N(0,1)", "lossless ratio (hidden)", "x", ratio)
        shutil.rmtree(cand.folder)


# --------------------------------------------------------------------------- report


def value(rows: list[Row], operation: str, backend: str, metric: str | None = None) -> float:
    found = [
        r.median
        for r in rows
        if r.operation == operation and r.backend == backend and (metric is None or r.metric == metric)
    ]
    return found[0] if found else float("nan")


def print_summary(rows: list[Row], cands: list[Candidate]) -> None:
    """Two tables: writes (MB/s, share of raw, sync after, size, ratio) and cold reads (both patterns)."""
    raw = value(rows, "write", "raw", "throughput (fsync'd)")
    head = "write (fsync'd)"
    print(f"\n{head:<20} {'MB/s':>7} {'% raw':>6} {'sync after':>11} {'bytes on disk':>15} {'ratio':>6}")
    for cand in cands:
        w = value(rows, "write", cand.name, "throughput (fsync'd)")
        synced = value(rows, "write", cand.name, "os.sync() after the write (untimed)")
        size, ratio = value(rows, "size", cand.name, "bytes on disk"), value(rows, "size", cand.name, "lossless ratio")
        print(f"{cand.name:<20} {w:>7.0f} {100 * w / raw:>5.0f}% {1e3 * synced:>8.1f} ms {size:>15,.0f} {ratio:>6.3f}")
    print(f"\n{'read (cold), MB/s':<26} {'one sample':>11} {'one layer':>10}")
    for cand in cands:
        for reader in cand.readers():
            one, across = value(rows, "read one sample", reader.label), value(rows, "read one layer", reader.label)
            print(f"{reader.label:<26} {'-' if np.isnan(one) else f'{one:.0f}':>11} {across:>10.0f}")


def targets(rows: list[Row], cands: list[Candidate]) -> list[str]:
    """Whether each vislens setting meets the targets: write >= 80% of raw at ratio >= 1.15; fastest layer read."""
    raw = value(rows, "write", "raw", "throughput (fsync'd)")
    best_base, base = max((value(rows, "read one layer", c.name), c.name) for c in cands if not isinstance(c, Vislens))
    lines = []
    for cand in (c for c in cands if isinstance(c, Vislens)):
        ratio = value(rows, "size", cand.name, "lossless ratio")
        share = value(rows, "write", cand.name, "throughput (fsync'd)") / raw
        layer, how = max((value(rows, "read one layer", r.label), r.label) for r in cand.readers())
        met1, met2 = share >= 0.8 and ratio >= 1.15, layer > best_base
        lines.append(
            f"{cand.name}: write {100 * share:.0f}% of raw, ratio {ratio:.3f} -> target 1 {'met' if met1 else 'missed'}; "
            f"one-layer read {layer:.0f} MB/s ({how}) vs best baseline {best_base:.0f} MB/s ({base}) -> target 2 "
            f"{'met' if met2 else 'missed'}"
        )
    return lines


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--samples", type=int, default=None, help="samples per candidate (default 8; 4 with --quick)")
    p.add_argument("--dir", type=Path, default=None, help="folder for the benchmark's files (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--repeats", type=int, default=None, help="write repetitions, interleaved (default 3; 1 with --quick)"
    )
    p.add_argument("--evict", choices=("drop_caches", "fadvise"), default="drop_caches",
                   help="how reads are made cold: drop the whole page cache (root), or posix_fadvise the files")  # fmt: skip
    args = p.parse_args()
    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    n = args.samples or (4 if args.quick else 8)
    repeats, read_repeats = (1, 2) if args.quick else (3, 5)
    repeats = args.repeats or repeats
    rng = np.random.default_rng(args.seed)
    profile = make_profile(rng, shape[0], shape[2])
    data = [make_sample(rng, profile, shape[1]) for _ in range(n)]
    label = f"{n} x {list(shape)} float16"
    bench = Bench(data, shape, repeats, read_repeats, label, [], evict=args.evict)
    contention = Contention()
    print(f"{label}: {bench.logical_mb:.0f} MB logical per candidate; writes x{repeats}, cold reads x{read_repeats}")

    with tempfile.TemporaryDirectory(prefix="vislens-bench-store-", dir=args.dir) as tmp:
        root = Path(tmp)
        cands: list[Candidate] = [
            Raw(root / "raw", n, shape),
            Safetensors(root / "safetensors", n, shape),
            TorchSave(root / "torch", n, shape),
            HDF5(root / "hdf5", n, shape),
            HDF5(root / "hdf5-shuffle", n, shape, shuffle=True),
            *[Vislens(root / f"vislens-c{c}", n, shape, c) for c in CLEVELS],
        ]
        measure_writes(bench, cands)
        for cand in cands:  # the last repetition's files
            measure_reads(bench, cand)
            shutil.rmtree(cand.folder)
        default = Vislens(root / "background", n, shape, DEFAULT_CLEVEL)
        fresh = np.random.default_rng(args.seed + 1)
        measure_background(bench, default, lambda i: make_sample(fresh, profile, shape[1]))
        shutil.rmtree(default.folder)
        bits = measure_keep_bits(bench, root)
        measure_iid(bench, root, rng, min(n, 2))

    print_summary(bench.rows, cands)
    print("\nbackground writer, store creation, i.i.d. ratio:")
    print_table(
        [r for r in bench.rows if r.operation in ("generate", "generate + write", "create") or "iid" in r.backend]
    )
    print(f"\n{'store':<12} {'keep bits':>9} {'bytes vs lossless':>18} {'vs float16':>11} {'max rel. error':>15}")
    for b, size, absolute, err in bits:
        print(f"{f'vislens-c{DEFAULT_CLEVEL}':<12} {b:>9} {size:>18.3f} {absolute:>11.3f} {err:>15.2e}")
    verdicts = targets(bench.rows, cands)
    print("\n" + "\n".join(verdicts))
    notes = [
        f"{label}; MB = 1e6 bytes of logical float16; generator: bench/_store_formats.py (Profile, make_sample)",
        "durable writes: baselines os.fsync every file and their folder inside the timed region; vislens is "
        "timed as it writes (write_sample per sample; its local store fsyncs each file and folder before "
        "returning), store creation apart ('create'); an untimed os.sync() after each write shows what was "
        "left dirty ('sync after')",
        f"cold reads: page cache evicted before every timed read with {bench.drop_method}; stores and HDF5 "
        "files opened before the clock, per-sample files and read_layer's store path inside; every read checked "
        "bit for bit",
        f"vislens-cN: Blosc zstd clevel N in 256 KiB blocks (clevel {DEFAULT_CLEVEL} is the default); "
        "read_layer: vislens.store.read_layer (concurrent partial shard reads, Blosc decompressing into the result)",
        f"HDF5 chunks {H5_CHUNKS}; gzip level 4 (h5py's default), without and with the shuffle filter",
        "torch.load reads one layer with mmap=True; safetensors with safe_open(...).get_slice",
        *verdicts,
        contention.note(),
    ]
    path = write_json("store", bench.rows, notes, args.out)
    print(f"\n{contention.note()}\nwrote {path}")


if __name__ == "__main__":
    main()
