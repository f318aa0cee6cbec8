"""Helpers shared by the subcommands: option parsers and the Dask context."""

from __future__ import annotations

import argparse
import json
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


def add_cluster_options(p: argparse.ArgumentParser) -> None:
    """``--scheduler ADDRESS`` (an existing Dask cluster) and ``--workers N`` (a local one)."""
    p.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run on an existing Dask cluster: its scheduler's address, e.g. tcp://host:8786 (docs/scaling.md)",
    )
    p.add_argument(
        "--workers", type=int, default=0, help="run on a local Dask cluster of N worker processes (0: threads)"
    )


def dask_context(args: argparse.Namespace):
    """The Dask cluster of ``--scheduler`` or ``--workers`` (`vislens.cluster.cluster`), quiet unless -v."""
    from vislens.cluster import cluster

    return cluster(
        getattr(args, "scheduler", None), getattr(args, "workers", 0), verbose=bool(getattr(args, "verbose", False))
    )
