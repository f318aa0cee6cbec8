"""``vislens extract``."""

from __future__ import annotations

import argparse

from vislens.cli.common import HelpFormatter, kinds, shard, storage_options


def add_extract(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extract",
        help="run a VLLM over images and prompts into a store",
        description=(
            "Run a vision LLM over (image, prompt) pairs and stream fp16 hidden states of every "
            "decoder layer, plus attention data for norm-based attention, into a Zarr v3 store. "
            "Rerunning the same command resumes; --shard i/n splits the work over processes."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", required=True, help="checkpoint folder or hub id (e.g. llava-hf/llava-1.5-7b-hf)")
    p.add_argument(
        "--data",
        required=True,
        help=(
            "data set: a JSONL manifest; 'synthetic[:N]' (the embedded shapes set); "
            "'coco:PATH/dataset_coco.json' (Karpathy split file; needs --images, uses --split); "
            "'winoground:PATH' (folder with examples.jsonl and images/, the examples.jsonl file, "
            "or the Hugging Face parquet export)"
        ),
    )
    p.add_argument(
        "--images",
        metavar="DIR",
        help="image root for coco: specs (holding train2014/, val2014/); for winoground: the images/ folder",
    )
    p.add_argument(
        "--split",
        default="test",
        choices=["train", "val", "test", "restval", "all"],
        help="Karpathy split of coco: specs",
    )
    p.add_argument("--out", required=True, help="store path or URL (s3://bucket/x.zarr, memory://x)")
    p.add_argument(
        "--prompts", type=kinds, default=("normal",), help="comma-separated prompt kinds: normal,noisy,empty"
    )
    p.add_argument("--prompt", help="one custom instruction instead of the study's ten normal prompts")
    p.add_argument("--prompts-file", help='JSON {"id": "prompt"} replacing the ten normal prompts')
    p.add_argument(
        "--noisy-prompts-file",
        help='JSON {"id": "text"} or a list of fixed noisy strings (e.g. the study\'s own) used instead of random ones',
    )
    p.add_argument(
        "--all-prompts",
        action="store_true",
        help="every prompt of the normal (and fixed noisy) set for every image; without it, image i gets prompt i mod n",
    )
    p.add_argument(
        "--limit",
        type=int,
        help="use only N images (winoground: N items of two images); the first N, or a random N with --seed",
    )
    p.add_argument("--seed", type=int, help="random sample of --limit images drawn with this seed")
    p.add_argument("--noise-seed", type=int, default=0, help="seed of the noisy prompts")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="samples per forward pass (default: 4; a resume takes the store's own, so that it reproduces the "
        "first run bit for bit)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch and numba threads (default: the usable cores; a resume takes the store's own)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if present)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float16", "bfloat16", "float32"],
        help="model dtype (auto: fp16 on GPU, fp32 on CPU)",
    )
    p.add_argument("--revision", help="model revision (branch, tag or commit) for hub ids")
    p.add_argument(
        "--attention",
        default="text",
        choices=["none", "last", "text", "all"],
        help="query rows whose attention is stored",
    )
    p.add_argument(
        "--keep",
        type=_keep,
        default=("hidden", "attention"),
        help="what the store holds per sample: hidden, attention (weights and value Gram matrices), both, or "
        "none (statistics only, with --compute); a 7B sample's hidden states are ~170 MB",
    )
    p.add_argument(
        "--capture",
        type=_capture,
        default=(),
        help="more capture points beside the decoder's residual stream, each its own array in the store's captures "
        "group: vision.layers, projector, decoder.attn_out, decoder.mlp_out, or re:REGEX for the outputs of modules "
        "whose name matches (model.named_modules())",
    )
    p.add_argument(
        "--compute",
        type=kinds,
        default=(),
        help="statistics computed during extraction on the model's device, into the store's results group "
        "(analyses then need no hidden states): cosine, norm-attention, lens; e.g. cosine,norm-attention,lens",
    )
    p.add_argument(
        "--layers",
        help="hidden-state layers to keep: start:stop[:step] or a list, e.g. 0:33:4 or 0,16,32 (0 = embeddings, "
        "l = output of decoder layer l; attention keeps the same decoder layers); statistics use every layer",
    )
    p.add_argument(
        "--lens-topk",
        type=int,
        metavar="K",
        help="compute the logit lens's top-K ids and logits during extraction, on the model's device (implies "
        "--compute lens; default K with --compute lens: 5, enough to re-score up to top-5 at ~0.6 MB per 7B sample; "
        "the analyses score top-1 by default: vislens's choice, docs/methods.md)",
    )
    p.add_argument(
        "--lens-all-tokens", action="store_true", help="--compute lens decodes every token, not only the image tokens"
    )
    p.add_argument("--keep-bits", type=int, help="LOSSY: keep N of fp16's 10 mantissa bits of hidden states (1-10)")
    p.add_argument("--shard", type=shard, default=(0, 1), help="this process's share i/n of the samples")
    p.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run on an existing Dask cluster (e.g. tcp://host:8786): one model per worker with a GPU resource, "
        "each filling its own shards of the store (docs/scaling.md)",
    )
    p.add_argument(
        "--shards",
        type=int,
        help="with --scheduler: split the samples into N shards (default: one per GPU worker, or per worker)",
    )
    p.add_argument(
        "--block",
        type=int,
        default=64,
        help="samples per file of the small per-sample arrays; --shard splits whole blocks",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing store made with other arguments")
    p.add_argument("--strict", action="store_true", help="fail on a missing/unreadable image instead of skipping it")
    p.add_argument("--storage-options", help="JSON fsspec options for the store URL (e.g. an S3 endpoint)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_extract)


def _keep(text: str) -> tuple[str, ...]:
    """Parse ``--keep``: a comma list of hidden, attention, or none."""
    items = kinds(text)
    return () if items == ("none",) else items


def _capture(text: str) -> tuple[str, ...]:
    """Parse ``--capture`` (checked by vislens.extract.modules.parse_capture)."""
    from vislens.extract.modules import parse_capture

    try:
        return parse_capture(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_extract(args: argparse.Namespace) -> int:
    from vislens.extract import ExtractConfig, extract
    from vislens.extract.config import LENS_TOPK

    config = ExtractConfig(
        model=args.model,
        data=args.data,
        out=args.out,
        prompts=args.prompts,
        prompt=args.prompt,
        prompts_file=args.prompts_file,
        noisy_prompts_file=args.noisy_prompts_file,
        all_prompts=args.all_prompts,
        images=args.images,
        split=args.split,
        limit=args.limit,
        seed=args.seed,
        noise_seed=args.noise_seed,
        batch_size=args.batch_size,
        threads=args.threads,
        device=args.device,
        dtype=args.dtype,
        revision=args.revision,
        attention=args.attention,
        keep=args.keep,
        capture=args.capture,
        compute=args.compute + (("lens",) if args.lens_topk and "lens" not in args.compute else ()),
        layers=args.layers,
        lens_topk=args.lens_topk or LENS_TOPK,
        lens_all_tokens=args.lens_all_tokens,
        keep_bits=args.keep_bits,
        shard=args.shard,
        block=args.block,
        overwrite=args.overwrite,
        strict=args.strict,
        progress=not args.no_progress,
        storage_options=storage_options(args.storage_options),
    )
    if args.shards is not None and not args.scheduler:
        raise SystemExit("--shards needs --scheduler (processes you start yourself take --shard i/n)")
    if not args.scheduler:
        print(extract(config).summary())
        return 0
    from vislens.cluster import check_workers, cluster
    from vislens.extract.distributed import extract_on_cluster

    with cluster(args.scheduler, verbose=bool(getattr(args, "verbose", False))) as client:
        check_workers(client)
        print(extract_on_cluster(config, client, shards=args.shards).summary())
    return 0
