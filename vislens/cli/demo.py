"""``vislens demo`` and ``vislens toy``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from vislens.cli.common import HelpFormatter, kinds


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole path on the embedded tiny LLaVA and synthetic shapes",
        description="Build (or reuse) the embedded tiny LLaVA and synthetic shapes data, extract them into "
        "DIR/store.zarr and run the analyses into DIR. No downloads; about a minute on 2 CPU cores.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=24, help="synthetic images")
    p.add_argument("--prompts", type=kinds, default=("normal", "noisy", "empty"), help="prompt kinds")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from vislens.demo import run_demo

    start = time.perf_counter()
    outputs = run_demo(Path(args.out), n_images=args.n, prompts=args.prompts, progress=not args.no_progress)
    for name, path in outputs.items():
        print(f"{name:>10}: {path}")
    print(f"demo finished in {time.perf_counter() - start:.1f} s")
    return 0


def add_toy(sub: argparse._SubParsersAction) -> None:
    from vislens.toys import TOY_FAMILIES

    p = sub.add_parser(
        "toy",
        help="build a tiny random-init checkpoint and print its folder (for --model)",
        description="Build (or reuse) a tiny random-init checkpoint of a supported model family, with an offline "
        "tokenizer and the family's real processor, and print its folder: pass it to --model to try vislens "
        "on that family without downloads. The default is the embedded tiny LLaVA.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--family", default="llava", choices=TOY_FAMILIES, help="model family")
    p.set_defaults(func=_cmd_toy)


def _cmd_toy(args: argparse.Namespace) -> int:
    from vislens.toys import toy_checkpoint

    print(toy_checkpoint(args.family))
    return 0
