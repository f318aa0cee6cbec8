"""One ``vislens`` command in its own process that logs every store file it writes.

Used by tests/store/test_shard_processes.py (not a test module itself)::

    python -m tests.store.shard_process LOG BARRIER N -- extract --model ... --shard i/n

Every file the process writes into a local store (through `DurableLocalStore`, the writer of
every local store) is appended to ``LOG``, one line ``<path>`` per write. Before its first sample,
the process waits until ``N`` processes have reached that point (files in the folder ``BARRIER``),
so that shard writers write at the same time.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path


def _instrument(log: Path, barrier: Path, n: int) -> None:
    from vislens.store import location, writer

    put = location._durable_put
    lock = threading.Lock()

    def logged_put(path: str, *args, **kwargs):
        with lock, open(log, "a", encoding="utf-8") as f:
            f.write(f"{path}\n")
        return put(path, *args, **kwargs)

    location._durable_put = logged_put

    write_arrays = writer.StoreWriter.write_arrays
    arrived = threading.Event()

    def write_after_barrier(self, index, arrays):
        with lock:
            if not arrived.is_set():
                (barrier / str(os.getpid())).touch()
                deadline = time.monotonic() + 120
                while len(list(barrier.iterdir())) < n:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"only {len(list(barrier.iterdir()))} of {n} shard processes started")
                    time.sleep(0.01)
                arrived.set()
        return write_arrays(self, index, arrays)

    writer.StoreWriter.write_arrays = write_after_barrier


def main(argv: list[str]) -> int:
    log, barrier, n, sep, *command = argv
    if sep != "--":
        raise SystemExit("usage: python -m tests.store.shard_process LOG BARRIER N -- COMMAND...")
    _instrument(Path(log), Path(barrier), int(n))
    from vislens.cli import main as vislens_main

    return vislens_main(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
