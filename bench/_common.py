"""What the benchmarks share: timing, long-format result rows, a printed table, JSON output,
the machine's measured memory bandwidth, and peak memory of one call in a fresh process.

Every benchmark writes rows (operation, backend, metric, unit, shape, median, p20, p80, machine,
version) to bench/results/<name>.json (or --out), so all results form one long table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import vislens

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Timing:
    """Seconds per call over the repeats."""

    median: float
    p20: float
    p80: float


@dataclass(frozen=True)
class Row:
    operation: str
    backend: str
    metric: str
    unit: str
    shape: str
    median: float
    p20: float
    p80: float
    machine: str
    version: str


def machine() -> str:
    cpu = f"{platform.machine()} x{torch.get_num_threads()} threads"
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{platform.node()} ({cpu}{gpu})"


def version() -> str:
    return f"vislens {vislens.__version__}, torch {torch.__version__}"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 10) -> Timing:
    """Median and 20th/80th percentiles of the wall time of fn() after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - begin)
    p20, p80 = np.percentile(times, [20, 80])
    return Timing(statistics.median(times), float(p20), float(p80))


def rate(amount: float, timing: Timing) -> Timing:
    """amount per second (e.g. GB/s) with the percentiles swapped to match (fast = high)."""
    return Timing(amount / timing.median, amount / timing.p80, amount / timing.p20)


def memory_bandwidth(device: str = "cpu", gib: float = 1.0, repeats: int = 10) -> Timing:
    """Measured read bandwidth in GB/s: an fp32 sum over `gib` GiB with all threads.

    The CPU array comes from numpy, which asks Linux for transparent huge pages as the stores'
    arrays do; torch's own CPU allocations read ~1.5x slower on a machine with THP=madvise.
    """
    n = int(gib * 2**30) // 4
    x = torch.from_numpy(np.ones(n, np.float32)) if device == "cpu" else torch.ones(n, device=device)
    return rate(x.nbytes / 1e9, time_call(lambda: x.sum(), repeats=repeats))


def _status_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _peak_in_child(setup: Callable, queue) -> None:
    warm, run = setup()
    warm()  # JIT compiles and caches outside the measured call
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        queue.put(torch.cuda.max_memory_allocated() - before)
        return
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set (VmHWM)
    before = _status_kib("VmRSS")
    run()
    queue.put((_status_kib("VmHWM") - before) * 1024)


def peak_memory(setup: Callable[[], tuple[Callable[[], object], Callable[[], object]]]) -> int:
    """Bytes one call adds at its peak, measured in a fresh process.

    setup (picklable, e.g. a functools.partial of a module-level function) builds the inputs and
    returns (warm, run): warm() runs the same code on small inputs, run() is measured. On a GPU
    this is torch.cuda.max_memory_allocated; on the CPU the resident-set high-water mark
    (/proc/self/status VmHWM, reset just before), which sees numba, numpy and torch alike.
    """
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_peak_in_child, args=(setup, queue))
    child.start()
    peak = queue.get()
    child.join()
    return peak


class Contention:
    """How much CPU other processes took while a benchmark ran (Linux /proc/stat)."""

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        """(wall, CPU-seconds busy on the machine, CPU-seconds of this process and its children)."""
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
        own = sum(
            getattr(resource.getrusage(who), field)
            for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
            for field in ("ru_utime", "ru_stime")
        )
        return time.perf_counter(), busy, own

    def note(self) -> str:
        """Share of the machine's CPU time used by other processes since construction."""
        (wall0, busy0, own0), (wall1, busy1, own1) = self._start, self._sample()
        share = max(0.0, (busy1 - busy0) - (own1 - own0)) / ((wall1 - wall0) * os.cpu_count())
        verdict = "timings are unreliable, rerun on a quiet machine" if share > 0.05 else "quiet"
        return f"other processes used {100 * share:.0f}% of the CPUs during this run: {verdict}"


def parser(description: str) -> argparse.ArgumentParser:
    """--quick (small shapes) and --out (JSON path), shared by every benchmark."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats (a smoke run)")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default bench/results/<name>.json)")
    return p


def print_table(rows: list[Row]) -> None:
    """One line per row: operation, backend, metric, shape, median [p20, p80] unit."""
    widths = [max(len(getattr(r, f)) for r in rows) for f in ("operation", "backend", "metric", "shape")]
    for r in rows:
        cells = [getattr(r, f).ljust(w) for f, w in zip(("operation", "backend", "metric", "shape"), widths)]
        print("  ".join(cells), f"{r.median:10.4g} [{r.p20:.4g}, {r.p80:.4g}] {r.unit}")


def write_json(name: str, rows: list[Row], notes: list[str], out: Path | None) -> Path:
    """Write {"rows": [...], "notes": [...]} to `out` or bench/results/<name>.json."""
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rows": [asdict(r) for r in rows], "notes": notes}, indent=1) + "\n")
    return path
