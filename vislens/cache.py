"""Where vislens keeps what it builds or unpacks (toy checkpoints, synthetic images, exports)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$VISLENS_CACHE`` or ``~/.cache/vislens``."""
    return Path(os.environ.get("VISLENS_CACHE", Path.home() / ".cache" / "vislens"))
