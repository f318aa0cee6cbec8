"""The threads of a vislens process: sized once, applied to torch and numba, and recorded.

vislens's own kernels sum in a fixed order (their results do not depend on the thread count),
but the model's forward does: torch's CPU GEMMs (MKL, oneDNN) pick their blocking, and with it
the order of their sums, by the number of threads and by the shapes of a batch. So an extraction
or ablation sets its threads once (`apply_threads`), records them in the store (`settings`), and
a resumed run takes the recorded ones again (`pinned`), so that it reproduces the first run bit
for bit. `vislens doctor` prints what this module sees.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger("vislens.runtime")


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Threads:
    """The threads a run uses: torch's intra-op pool and numba's parallel kernels."""

    torch: int
    numba: int

    def as_attrs(self) -> dict[str, int]:
        return asdict(self)


def current() -> Threads:
    """The threads torch and numba use now in this process."""
    import numba
    import torch

    return Threads(torch.get_num_threads(), numba.get_num_threads())


def apply_threads(n: int) -> Threads:
    """Use ``n`` threads in torch and numba (numba at most its pool's size, NUMBA_NUM_THREADS)."""
    import numba
    import torch

    if n < 1:
        raise ValueError(f"threads must be at least 1, got {n}")
    # numba first: starting its threading layer (an OpenMP one) resets the OpenMP threads torch reads
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return current()


def _settle(what: str, requested: int | None, stored: int | None, default: int, flag: str) -> int:
    if requested is None:
        return stored if stored is not None else default
    if stored is not None and stored != requested:
        log.warning(
            "the store was written %s %d and this run uses %d: the model's CPU forward may round "
            "differently in the last bits (vislens's own sums do not follow either); leave out %s to "
            "resume with the store's own",
            what,
            stored,
            requested,
            flag,
        )
    return requested


def pin(
    batch_size: int | None, threads: int | None, recorded: dict[str, Any] | None, default_batch: int
) -> tuple[int, int]:
    """The batch size and thread count of a run, with the threads applied to this process: as
    asked (``--batch-size``, ``--threads``); else as the store records them (a resume reproduces
    its first run: the model's CPU forward rounds by the batch's shape and the thread count);
    else ``default_batch`` and the usable cores. A value asked for that differs from the
    recorded one is used, with a warning that the model's last bits may then differ."""
    recorded = recorded or {}
    stored_threads = (recorded.get("threads") or {}).get("torch")
    stored_batch = recorded.get("batch_size")
    batch = _settle("in batches of", batch_size, stored_batch, default_batch, "--batch-size")
    count = _settle("with torch threads:", threads, stored_threads, usable_cores(), "--threads")
    apply_threads(int(count))
    return int(batch), int(count)


def settings() -> dict[str, Any]:
    """What a store records of the machine that wrote it: threads, CPU, torch's CPU kernels."""
    import torch

    from vislens.kernels._cpu import describe_cpu

    return {
        "threads": current().as_attrs(),
        "cpu": describe_cpu(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
