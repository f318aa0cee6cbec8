"""Helpers shared by the subcommands: option parsers and the Dask context."""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
from typing import Any


def storage_options(text: str | None) -> dict[str, Any]:
    """Parse ``--storage-options`` JSON."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"--storage-options must be JSON, e.g. '{{\"anon\": true}}' ({exc.msg})") from None
    if not isinstance(value, dict):
        raise SystemExit("--storage-options must be a JSON object")
    return value


def shard(text: str) -> tuple[int, int]:
    """Parse ``--shard i/n``."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard i/n needs 0 <= i < n, got {text!r}")
    return i, n


def kinds(text: str) -> tuple[str, ...]:
    """Parse a comma-separated list."""
    return tuple(k.strip() for k in text.split(",") if k.strip())


def dask_context(workers: int):
    """A local Dask cluster of ``workers`` processes, or the default threads when 0."""
    if workers <= 0:
        return nullcontext()
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    return Client(cluster)
