"""``vislens demo`` and ``vislens toy`` (``vislens toy train``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from vislens.cli.common import HelpFormatter, kinds


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole path on the embedded trained toy LLaVA and InstructBLIP and the shapes world",
        description="Extract the shipped trained toy LLaVA (DIR/store.zarr) and toy InstructBLIP "
        "(DIR/instructblip.zarr) on held-out shapes-world images, add a truncation ablation to each store and run "
        "every analysis into DIR (DIR/report/index.html). No downloads; about a minute on 2 CPU cores. "
        "The toys are described in docs/toy-model.md.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=24, help="held-out shapes-world images")
    p.add_argument("--prompts", type=kinds, default=("normal", "noisy", "empty"), help="prompt kinds")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from vislens.demo import run_demo

    start = time.perf_counter()
    outputs = run_demo(Path(args.out), n_images=args.n, prompts=args.prompts, progress=not args.no_progress)
    for name, path in outputs.items():
        print(f"{name:>12}: {path}")
    print(f"demo finished in {time.perf_counter() - start:.1f} s")
    return 0


def add_toy(sub: argparse._SubParsersAction) -> None:
    from vislens.toys import TOY_FAMILIES
    from vislens.toys.trained import TRAINED_FAMILIES

    p = sub.add_parser(
        "toy",
        help="print the folder of a tiny checkpoint (for --model); `vislens toy train` trains one",
        description="Print the folder of a tiny checkpoint, to pass to --model: with --trained, the shipped trained "
        "toy (llava or instructblip, docs/toy-model.md); else a random-init checkpoint of any supported family, "
        "built once with an offline tokenizer and the family's real processor. `vislens toy train` trains a toy "
        "from scratch on the CPU.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--family", default="llava", choices=TOY_FAMILIES, help="model family")
    p.add_argument("--trained", action="store_true", help="the shipped trained toy (llava or instructblip)")
    p.set_defaults(func=_cmd_toy)
    toy_sub = p.add_subparsers(dest="toy_command", metavar="train")
    t = toy_sub.add_parser(
        "train",
        help="train a toy VLLM from scratch on the shapes world (CPU, seeded)",
        description="Train the toy LLaVA or InstructBLIP from scratch on the shapes world in stages (text-only "
        "decoder pretraining; the vision tower, and InstructBLIP's Q-Former, through probes that are thrown away; "
        "projector alignment with the decoder frozen; joint tuning of projector and decoder), fully seeded, on the "
        "CPU, and save it with save_pretrained into --out. 10-12 minutes per toy on one thread (docs/toy-model.md).",
        formatter_class=HelpFormatter,
    )
    t.add_argument("--family", default="llava", choices=TRAINED_FAMILIES, help="model family")
    t.add_argument("--out", required=True, help="output folder (the shipped toys: vislens/toys/weights/FAMILY)")
    t.add_argument("--seed", type=int, default=0, help="seed of the initialisation, data order and prompts")
    t.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it)")
    t.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation after each stage")
    t.set_defaults(func=_cmd_toy_train)


def _cmd_toy(args: argparse.Namespace) -> int:
    if args.trained:
        from vislens.toys.trained import trained_toy_path

        print(trained_toy_path(args.family))
        return 0
    from vislens.toys import toy_checkpoint

    print(toy_checkpoint(args.family))
    return 0


def _cmd_toy_train(args: argparse.Namespace) -> int:
    import logging

    from vislens.toys.train import TrainConfig, train_toy

    logging.getLogger("vislens.toys").setLevel(logging.INFO)
    config = TrainConfig(family=args.family, seed=args.seed, threads=args.threads, eval_every_stage=not args.no_eval)
    _, _, report = train_toy(Path(args.out), config)
    for stage in report.stages:
        print(stage)
    print(f"trained {args.family} in {report.total_seconds:.0f} s into {args.out}")
    return 0
