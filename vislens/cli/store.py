"""``vislens info`` and ``vislens verify``."""

from __future__ import annotations

import argparse
import json
import sys

from vislens.cli.common import storage_options


def add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="what a store holds: model, samples, groups, bytes and compression per array",
        description="Show a store's model, samples done/total, groups, bytes on disk and compression ratio per array.",
    )
    p.add_argument("store", metavar="STORE", help="store path or URL")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--storage-options", help="JSON fsspec options for the store URL")
    p.set_defaults(func=_cmd_info)


def _cmd_info(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from vislens.store.inspect import format_info, info

    report = info(args.store, storage_options(args.storage_options))
    if args.json:
        report["variables"] = [asdict(v) | {"ratio": v.ratio} for v in report["variables"]]
        print(json.dumps(report, indent=1, default=str))
    else:
        print(format_info(report))
    return 0


def add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="read every chunk, check checksums and schema; non-zero exit names the bad array and chunk",
        description="Read every chunk of every array (crc32c checksums), check the schema, and check that every "
        "sample marked done has its data. Exits 1 and names each bad array and chunk when something is wrong.",
    )
    p.add_argument("store", metavar="STORE", help="store path or URL")
    p.add_argument("--storage-options", help="JSON fsspec options for the store URL")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_verify)


def _cmd_verify(args: argparse.Namespace) -> int:
    from vislens.store.inspect import verify

    problems = verify(args.store, storage_options(args.storage_options), progress=not args.no_progress)
    if not problems:
        print(f"{args.store}: every chunk read and checksummed; schema and done flags consistent")
        return 0
    for problem in problems:
        print(f"BAD {problem}", file=sys.stderr)
    print(
        f"{args.store}: {len(problems)} problem(s); re-extract the affected samples (reset their done flag "
        "or rerun with --overwrite)",
        file=sys.stderr,
    )
    return 1
