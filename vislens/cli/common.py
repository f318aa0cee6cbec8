"""Helpers shared by the subcommands: option parsers and the Dask context."""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
from typing import Any


class HelpFormatter(argparse.HelpFormatter):
    """Help that shows real defaults only: not for required options, flags, or options whose default
    is 'not given' (their help says what happens then); lists print as ``a,b`` as typed."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "(default" in text
            or action.required
            or default is None
            or default is False
            or default == argparse.SUPPRESS
            or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction))
            or not action.option_strings
        ):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


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
    import logging

    from distributed import Client, LocalCluster

    quiet = logging.getLogger("vislens").getEffectiveLevel() > logging.INFO
    if quiet:  # distributed sets its loggers to INFO when imported; -v keeps them
        for name in ("distributed", "distributed.core", "distributed.http.proxy", "distributed.batched"):
            logging.getLogger(name).setLevel(logging.ERROR)
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=logging.ERROR if quiet else logging.INFO,
    )
    return Client(cluster)
