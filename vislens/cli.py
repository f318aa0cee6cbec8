"""The ``vislens`` command: a thin layer of argument parsing over the public functions."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from vislens.errors import VislensError

DESCRIPTION = """\
vislens: extract the internals of a vision LLM once, analyse them many times.

  vislens demo --out DIR             the whole path on the embedded tiny LLaVA (no downloads)
  vislens extract --model M --data D --out STORE
  vislens analyze cosine STORE --out DIR
  vislens info STORE / vislens verify STORE

Stores are Zarr v3 folders (or s3://, memory://, https:// URLs) readable with xarray.
"""


def _storage_options(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"--storage-options must be JSON, e.g. '{{\"anon\": true}}' ({exc.msg})") from None
    if not isinstance(value, dict):
        raise SystemExit("--storage-options must be a JSON object")
    return value


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard i/n needs 0 <= i < n, got {text!r}")
    return i, n


def _kinds(text: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in text.split(",") if k.strip())


def _add_extract(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extract",
        help="run a VLLM over images and prompts into a store",
        description=(
            "Run a vision LLM over (image, prompt) pairs and stream fp16 hidden states of every "
            "decoder layer, plus attention data for norm-based attention, into a Zarr v3 store. "
            "Rerunning the same command resumes; --shard i/n splits the work over processes."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="checkpoint folder or hub id (e.g. llava-hf/llava-1.5-7b-hf)")
    p.add_argument("--data", required=True, help="JSONL manifest, or 'synthetic[:N]' for the embedded shapes set")
    p.add_argument("--out", required=True, help="store path or URL (s3://bucket/x.zarr, memory://x)")
    p.add_argument("--prompts", type=_kinds, default=("normal",), help="comma-separated prompt kinds: normal,noisy,empty")
    p.add_argument("--prompt", help="one custom instruction instead of the study's ten normal prompts")
    p.add_argument("--prompts-file", help='JSON {"id": "prompt"} replacing the ten normal prompts')
    p.add_argument("--all-prompts", action="store_true", help="every normal prompt for every image (default: cycle through them)")
    p.add_argument("--limit", type=int, help="use only N images (the first N, or a random N with --seed)")
    p.add_argument("--seed", type=int, help="random sample of --limit images drawn with this seed")
    p.add_argument("--noise-seed", type=int, default=0, help="seed of the noisy prompts")
    p.add_argument("--batch-size", type=int, default=4, help="samples per forward pass")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if present)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"], help="model dtype (auto: fp16 on GPU, fp32 on CPU)")
    p.add_argument("--revision", help="model revision (branch, tag or commit) for hub ids")
    p.add_argument("--attention", default="text", choices=["none", "last", "text", "all"], help="query rows whose attention is stored")
    p.add_argument("--keep-bits", type=int, help="LOSSY: keep N of fp16's 10 mantissa bits of hidden states (1-10)")
    p.add_argument("--shard", type=_shard, default=(0, 1), help="this process's share i/n of the samples")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store made with other arguments")
    p.add_argument("--strict", action="store_true", help="fail on a missing/unreadable image instead of skipping it")
    p.add_argument("--storage-options", help="JSON fsspec options for the store URL (e.g. an S3 endpoint)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_extract)


def _cmd_extract(args: argparse.Namespace) -> int:
    from vislens.extract import ExtractConfig, extract

    config = ExtractConfig(
        model=args.model,
        data=args.data,
        out=args.out,
        prompts=args.prompts,
        prompt=args.prompt,
        prompts_file=args.prompts_file,
        all_prompts=args.all_prompts,
        limit=args.limit,
        seed=args.seed,
        noise_seed=args.noise_seed,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        revision=args.revision,
        attention=args.attention,
        keep_bits=args.keep_bits,
        shard=args.shard,
        overwrite=args.overwrite,
        strict=args.strict,
        progress=not args.no_progress,
        storage_options=_storage_options(args.storage_options),
    )
    print(extract(config).summary())
    return 0


def _add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="analyses over stores (no model needed)", description="Analyses over one or more stores.")
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
    c.add_argument("--workers", type=int, default=0, help="run on a local Dask cluster of N worker processes (0: threads)")
    c.add_argument("--storage-options", help="JSON fsspec options for the store URLs")
    c.set_defaults(func=_cmd_cosine)


def _dask_context(workers: int):
    from contextlib import nullcontext

    if workers <= 0:
        return nullcontext()
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    return Client(cluster)


def _cmd_cosine(args: argparse.Namespace) -> int:
    from vislens.analyze.cosine import cosine_table
    from vislens.analyze.figures import plot_cosine
    from vislens.store import open_store

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    options = _storage_options(args.storage_options)
    with _dask_context(args.workers):
        trees = [open_store(s, options) for s in args.stores]
        table = cosine_table(trees, backend=args.backend)
    table.to_csv(out / "cosine.csv", index=False)
    plot_cosine(table, out / "cosine.png")
    print(f"wrote {out / 'cosine.csv'} ({len(table)} rows) and {out / 'cosine.png'}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole path on the embedded tiny LLaVA and synthetic shapes",
        description="Build (or reuse) the embedded tiny LLaVA and synthetic shapes data, extract them into "
        "DIR/store.zarr and run the analyses into DIR. No downloads; about a minute on 2 CPU cores.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=24, help="synthetic images")
    p.add_argument("--prompts", type=_kinds, default=("normal", "noisy", "empty"), help="prompt kinds")
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


def _add_toy(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("toy", help="build the embedded tiny LLaVA and print its folder", description="Build (or reuse) the embedded tiny LLaVA checkpoint and print its folder, for --model.")
    p.set_defaults(func=_cmd_toy)


def _cmd_toy(args: argparse.Namespace) -> int:
    from vislens.extract.toy_model import toy_model_path

    print(toy_model_path())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``vislens`` argument parser."""
    from vislens import __version__

    parser = argparse.ArgumentParser(prog="vislens", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"vislens {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_extract, _add_analyze, _add_demo, _add_toy):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vislens`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except VislensError as exc:
        print(f"vislens {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
