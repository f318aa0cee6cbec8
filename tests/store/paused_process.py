"""One ``vislens`` command that pauses before its first sample write (not a test module).

Used by tests/store/test_claims.py::

    python -m tests.store.paused_process RELEASE -- extract --model ...

Before writing its first sample (so after creating the store and claiming its blocks), the
process creates ``RELEASE`` with the suffix ``.paused`` and waits until ``RELEASE`` exists.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path


def _pause_before_first_write(release: Path) -> None:
    from vislens.store import writer

    write_arrays = writer.StoreWriter.write_arrays
    lock, passed = threading.Lock(), threading.Event()

    def paused(self, index, arrays):
        with lock:
            if not passed.is_set():
                release.with_suffix(".paused").touch()
                deadline = time.monotonic() + 300
                while not release.exists():
                    if time.monotonic() > deadline:
                        raise TimeoutError("never released")
                    time.sleep(0.02)
                passed.set()
        return write_arrays(self, index, arrays)

    writer.StoreWriter.write_arrays = paused


def main(argv: list[str]) -> int:
    release, sep, *command = argv
    if sep != "--":
        raise SystemExit("usage: python -m tests.store.paused_process RELEASE -- COMMAND...")
    _pause_before_first_write(Path(release))
    from vislens.cli import main as vislens_main

    return vislens_main(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
