"""``vislens analyze ...``: analyses over one or more stores (no model needed)."""

from __future__ import annotations

import argparse
from pathlib import Path

from vislens.cli.ablate import add_ablation_analysis
from vislens.cli.common import HelpFormatter, dask_context, storage_options

BACKENDS = ["auto", "numba", "torch", "triton"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("stores", nargs="+", metavar="STORE", help="store paths or URLs (several: side by side)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--workers", type=int, default=0, help="run on a local Dask cluster of N worker processes (0: threads)"
    )
    p.add_argument("--storage-options", help="JSON fsspec options for the store URLs")
    p.add_argument(
        "--require-complete",
        action="store_true",
        help="refuse a store whose extraction has not finished (default: analyse its finished samples, with a warning)",
    )
    p.add_argument(
        "--by",
        default="kind",
        choices=["kind", "prompt"],
        help="average samples per prompt kind, or per single prompt (kind and id: e.g. a statement vs a question)",
    )


def add_analyze(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    p = sub.add_parser(
        "analyze", help="analyses over stores (no model needed)", description="Analyses over one or more stores."
    )
    asub = p.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    fmt = HelpFormatter

    c = asub.add_parser(
        "cosine",
        help="inter- and intra-modal cosine similarity per layer",
        formatter_class=fmt,
        description="Mean cosine similarity between image-token and text-token hidden states (and within "
        "each modality), per layer and prompt kind or prompt. The text tokens are those of the instruction by default "
        "(not BOS, not the chat template): the study's definition. Definitions: docs/methods.md (analysis 2). "
        "Writes DIR/cosine.csv, DIR/cosine.png.",
    )
    _common(c)
    c.add_argument(
        "--text-tokens",
        default="instruction",
        choices=["instruction", "all", "template"],
        help="which tokens are the text side: the instruction only; all = every non-image token (BOS and template "
        "included); template = template words and special tokens other than BOS",
    )
    c.add_argument("--backend", default="auto", choices=BACKENDS, help="kernel backend")
    c.set_defaults(func=_cmd_cosine)

    lens = asub.add_parser(
        "logit-lens",
        help="logit lens on image tokens: precision/recall against captions",
        formatter_class=fmt,
        description="Decode every image token at every layer through the final norm and unembedding, each "
        "image token on its own, and score its words against the reference captions: precision (distinct words), "
        "token precision (per image token) and recall. Definitions: docs/methods.md (analysis 1). Top-k ids are "
        "cached in the store's results group. Writes DIR/logit_lens.csv and DIR/logit_lens.png.",
    )
    _common(lens)
    lens.add_argument("--top-k", type=int, default=1, help="decode the top-k tokens of every image token")
    lens.add_argument("--no-cache", action="store_true", help="neither read nor write the cached top-k ids")
    lens.set_defaults(func=_cmd_logit_lens)

    na = asub.add_parser(
        "norm-attention",
        help="norm-based attention: image share per layer, heatmaps",
        formatter_class=fmt,
        description="Norm-based attention (Kobayashi et al., 2020; docs/methods.md, analysis 3): per layer the share "
        "of text queries' attention that lands on image tokens; per chosen sample the layers x tokens heatmap of "
        "the last prompt token and its most-attended image tokens in the patch grid.",
    )
    _common(na)
    na.add_argument(
        "--samples", help="comma-separated image ids (id or id:prompt_kind) or sample numbers (default: first 3)"
    )
    na.add_argument("--top", type=int, default=10, help="most-attended image tokens listed per layer")
    na.add_argument("--backend", default="auto", choices=BACKENDS, help="kernel backend")
    na.set_defaults(func=_cmd_norm_attention)
    add_ablation_analysis(asub)
    return asub


def _open(args: argparse.Namespace):
    from vislens.store import open_store

    options = storage_options(args.storage_options)
    return [open_store(s, options) for s in args.stores]


def _report(written: dict[str, Path]) -> int:
    for path in written.values():
        print(f"wrote {path}")
    return 0


def _cmd_cosine(args: argparse.Namespace) -> int:
    from vislens.analyze.outputs import write_cosine

    with dask_context(args.workers):
        return _report(
            write_cosine(
                _open(args),
                Path(args.out),
                text_tokens=args.text_tokens,
                by=args.by,
                backend=args.backend,
                require=args.require_complete,
            )
        )


def _cmd_logit_lens(args: argparse.Namespace) -> int:
    from vislens.analyze.outputs import write_logit_lens

    with dask_context(args.workers):
        return _report(
            write_logit_lens(
                _open(args),
                Path(args.out),
                top_k=args.top_k,
                by=args.by,
                cache=not args.no_cache,
                progress=True,
                require=args.require_complete,
            )
        )


def _cmd_norm_attention(args: argparse.Namespace) -> int:
    from vislens.analyze.outputs import write_norm_attention

    samples = [s.strip() for s in args.samples.split(",")] if args.samples else None
    with dask_context(args.workers):
        return _report(
            write_norm_attention(
                _open(args),
                Path(args.out),
                samples=samples,
                top=args.top,
                by=args.by,
                backend=args.backend,
                progress=True,
                require=args.require_complete,
            )
        )


def add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="one HTML page with every analysis of one or more stores",
        description="Run every analysis the stores support (logit lens, cosine, norm-based attention, ablations) and "
        "write DIR/index.html with all figures and tables, labelled by model, data set and prompt kind.",
        formatter_class=HelpFormatter,
    )
    _common(p)
    p.add_argument("--top-k", type=int, default=1, help="logit-lens top-k")
    p.add_argument("--samples", help="samples for the norm-attention heatmaps (image ids or sample numbers)")
    p.add_argument(
        "--text-tokens",
        default="instruction",
        choices=["instruction", "all", "template"],
        help="text side of the cosine analysis (see `vislens analyze cosine --help`)",
    )
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="kernel backend")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from vislens.analyze.report import write_report

    samples = [s.strip() for s in args.samples.split(",")] if args.samples else None
    with dask_context(args.workers):
        index = write_report(
            _open(args),
            Path(args.out),
            top_k=args.top_k,
            samples=samples,
            text_tokens=args.text_tokens,
            by=args.by,
            backend=args.backend,
            progress=True,
            require=args.require_complete,
        )
    print(f"wrote {index}")
    return 0
