"""``vislens analyze ...``: analyses over stores."""

from __future__ import annotations

import argparse
from pathlib import Path

from vislens.cli.common import dask_context, storage_options


def add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze", help="analyses over stores (no model needed)", description="Analyses over one or more stores."
    )
    asub = p.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    c = asub.add_parser(
        "cosine",
        help="inter-modal cosine similarity per layer",
        description="Mean cosine similarity between image-token and text-token hidden states, per layer and prompt "
        "kind (METHODS.md, analysis 2); writes DIR/cosine.csv and DIR/cosine.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    c.add_argument("stores", nargs="+", metavar="STORE", help="store paths or URLs (several: side by side)")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--backend", default="auto", choices=["auto", "numba", "torch", "triton"], help="kernel backend")
    c.add_argument(
        "--workers", type=int, default=0, help="run on a local Dask cluster of N worker processes (0: threads)"
    )
    c.add_argument("--storage-options", help="JSON fsspec options for the store URLs")
    c.set_defaults(func=_cmd_cosine)


def _cmd_cosine(args: argparse.Namespace) -> int:
    from vislens.analyze.cosine import cosine_table
    from vislens.analyze.figures import plot_cosine
    from vislens.store import open_store

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    options = storage_options(args.storage_options)
    with dask_context(args.workers):
        trees = [open_store(s, options) for s in args.stores]
        table = cosine_table(trees, backend=args.backend)
    table.to_csv(out / "cosine.csv", index=False)
    plot_cosine(table, out / "cosine.png")
    print(f"wrote {out / 'cosine.csv'} ({len(table)} rows) and {out / 'cosine.png'}")
    return 0
