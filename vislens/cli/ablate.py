"""``vislens ablate`` and ``vislens analyze ablation``."""

from __future__ import annotations

import argparse
from pathlib import Path

from vislens.cli.common import HelpFormatter, add_cluster_options, dask_context, shard, storage_options


def _ks(text: str) -> tuple[int, ...]:
    from vislens.ablate.settings import parse_ks
    from vislens.errors import ConfigError

    try:
        return parse_ks(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _intervals(text: str) -> tuple[tuple[int, int], ...]:
    from vislens.ablate.settings import parse_intervals
    from vislens.errors import ConfigError

    try:
        return parse_intervals(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_ablate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ablate",
        help="caption loss against the image tokens kept (truncate) or masked (mask)",
        description=(
            "For every image and prompt, the teacher-forced loss of a reference caption (mean cross-entropy of "
            "the caption tokens; input = the prompt in the chat template, a space, the caption) with image "
            "tokens truncated or masked (docs/methods.md, analysis 4). One pass over the image prefix serves every "
            "setting. Results go to the store's ablation group; rerunning the same command resumes."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", required=True, help="checkpoint folder or hub id (e.g. llava-hf/llava-1.5-7b-hf)")
    p.add_argument("--data", required=True, help="data spec: JSONL manifest, synthetic[:N], coco:PATH, winoground:PATH")
    p.add_argument("--out", required=True, help="new store, or an existing vislens store to add the group to")
    p.add_argument("--mode", default="truncate", choices=["truncate", "mask"], help="what each setting does")
    p.add_argument("--ks", type=_ks, help="truncate: k values, e.g. 1-32,64,576 (default: every k = 1..n)")
    p.add_argument(
        "--intervals", type=_intervals, help="mask: START:STOP intervals, 0-based, STOP excluded (default: each token)"
    )
    p.add_argument("--interval-width", type=int, help="mask: consecutive intervals of this many tokens")
    p.add_argument(
        "--mask-style",
        default="block",
        choices=["block", "remove"],
        help="block: masked tokens stay, no later token attends to them (positions unchanged); "
        "remove: they are taken out of the input (later positions shift down)",
    )
    p.add_argument("--prompts-file", help='JSON {"id": "prompt"}: every prompt of it (default: the first five normal)')
    p.add_argument("--caption-index", type=int, default=0, help="which reference caption of each image is scored")
    p.add_argument("--images", help="image root folder for coco: (and winoground:) data specs")
    p.add_argument("--split", default="test", help="COCO split: train, val, test, restval or all")
    p.add_argument("--limit", type=int, help="use only N images (the first N, or a random N with --seed)")
    p.add_argument("--seed", type=int, help="random sample of --limit images drawn with this seed")
    p.add_argument(
        "--token-loss",
        default="float32",
        choices=["float32", "float16", "none"],
        help="keep per-caption-token losses of every setting in this dtype (none: only the means)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="settings per forward pass (default: 16; a resume takes the group's own, so that it reproduces "
        "the first run bit for bit)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch and numba threads (default: the usable cores; a resume takes the group's own)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if present)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"], help="model dtype")
    p.add_argument("--revision", help="model revision (branch, tag or commit) for hub ids")
    p.add_argument("--group", default="ablation", help="store group to write (several runs can share a store)")
    p.add_argument(
        "--method", default="shared", choices=["shared", "naive"], help="naive: one full pass per setting (checking)"
    )
    p.add_argument(
        "--block", type=int, default=64, help="images per file of the per-pair arrays; --shard splits whole blocks"
    )
    p.add_argument("--shard", type=shard, default=(0, 1), help="this process's share i/n of the images")
    p.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run on an existing Dask cluster (e.g. tcp://host:8786): one model per worker with a GPU resource, "
        "each filling its own shards of the group (docs/scaling.md)",
    )
    p.add_argument(
        "--shards",
        type=int,
        help="with --scheduler: split the images into N shards (default: one per GPU worker, or per worker)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a group made with other arguments")
    p.add_argument("--strict", action="store_true", help="fail on an unreadable image instead of skipping it")
    p.add_argument("--storage-options", help="JSON fsspec options for the store URL")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_ablate)


def _cmd_ablate(args: argparse.Namespace) -> int:
    from vislens.ablate import AblateConfig, ablate

    config = AblateConfig(
        model=args.model,
        data=args.data,
        out=args.out,
        mode=args.mode,
        ks=args.ks,
        intervals=args.intervals,
        interval_width=args.interval_width,
        mask_style=args.mask_style,
        prompts_file=args.prompts_file,
        caption_index=args.caption_index,
        images=args.images,
        split=args.split,
        limit=args.limit,
        seed=args.seed,
        token_loss=None if args.token_loss == "none" else args.token_loss,
        batch_size=args.batch_size,
        threads=args.threads,
        device=args.device,
        dtype=args.dtype,
        revision=args.revision,
        group=args.group,
        method=args.method,
        overwrite=args.overwrite,
        strict=args.strict,
        progress=not args.no_progress,
        storage_options=storage_options(args.storage_options),
        block=args.block,
        shard=args.shard,
    )
    if args.shards is not None and not args.scheduler:
        raise SystemExit("--shards needs --scheduler (processes you start yourself take --shard i/n)")
    if not args.scheduler:
        print(ablate(config).summary())
        return 0
    from vislens.ablate.distributed import ablate_on_cluster
    from vislens.cluster import check_workers, cluster

    with cluster(args.scheduler, verbose=bool(getattr(args, "verbose", False))) as client:
        check_workers(client)
        print(ablate_on_cluster(config, client, shards=args.shards).summary())
    return 0


def add_ablation_analysis(asub: argparse._SubParsersAction) -> None:
    c = asub.add_parser(
        "ablation",
        help="loss vs image tokens kept or masked (the study's figures 4.6, 4.7)",
        description="Summaries of a `vislens ablate` group (docs/methods.md, analysis 4): truncation curves per prompt "
        "with the study's threshold and the smallest fraction of image tokens giving 70% of the loss reduction, "
        "or the loss per masked token/interval; CSV tables and PNG figures in DIR.",
        formatter_class=HelpFormatter,
    )
    c.add_argument("store", metavar="STORE", help="store path or URL")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--group", default="ablation", help="the ablation group to read")
    c.add_argument("--target", type=float, default=0.7, help="share of the total loss reduction to reach")
    c.add_argument("--storage-options", help="JSON fsspec options for the store URL")
    add_cluster_options(c)
    c.set_defaults(func=_cmd_ablation)


def _cmd_ablation(args: argparse.Namespace) -> int:
    from vislens.analyze.ablation import write_ablation_report
    from vislens.store import open_store
    from vislens.store.reader import location_of

    with dask_context(args) as client:
        tree = open_store(args.store, storage_options(args.storage_options))
        if client is not None:
            from vislens.cluster import check_workers

            check_workers(client, [location_of(tree)])
        written = write_ablation_report(tree, Path(args.out), group_name=args.group, target=args.target)
    for path in written.values():
        print(f"wrote {path}")
    return 0
