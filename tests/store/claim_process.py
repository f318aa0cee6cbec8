"""A process that claims blocks of a store and holds the claim until killed (not a test module).

Used by tests/store/test_claims.py::

    python -m tests.store.claim_process URL OPTIONS_JSON GROUP BLOCKS READY

``BLOCKS`` is ``all`` or comma-separated block numbers; once the claim is held, the file
``READY`` is created; the process then sleeps until it is killed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    url, options, group, blocks, ready = argv
    from vislens.store import claims
    from vislens.store.location import StoreLocation

    location = StoreLocation(url, json.loads(options))
    wanted = claims.ALL if blocks == "all" else [int(b) for b in blocks.split(",")]
    claims.claim(location, group, wanted, what="test holder")
    Path(ready).touch()
    while True:
        time.sleep(60)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
