"""Benchmark: shared-prefix ablation vs one full forward per truncated input.

A tiny LLaVA-architecture model with 576 image tokens (24 x 24 patches, as LLaVA-1.5) and a
~40-token suffix (prompt + caption after the image); all 576 truncation settings of a few images,
both paths batched with the same batch size. Reports token positions and query-key pairs the
decoder computed (padding included), a FLOP estimate with attention (for the bench model and
projected to LLaVA-1.5-7B shapes with the same counts), wall time, and the largest loss
difference. Writes bench/results/ablate.json.

    python bench/ablate.py [--quick] [--images 3] [--batch-size 16] [--repeats 3] [--captions 2] [--out FILE]
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import Contention, Row, Timing, machine, parser, print_table, version, write_json  # noqa: E402

from vislens.ablate import Work, naive_losses, shared_prefix_losses
from vislens.ablate.inputs import encode_pairs, plan_pairs
from vislens.extract.adapters import load_adapter
from vislens.extract.datasets import load_data
from vislens.extract.images import load_image
from vislens.extract.prompts import Prompt
from vislens.toys import ToySpec, toy_model_path
from vislens.toys.shapes import make_shapes

SPEC = ToySpec(image_size=96, patch_size=4, layers=4, hidden=128, heads=4, kv_heads=4, intermediate=344)
PROMPT = Prompt(
    "normal", "bench", "Give a concise explanation of the image content and sum up briefly what is shown in the image:"
)


@dataclass(frozen=True)
class Shape:
    """Decoder sizes for the FLOP estimate."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    def flops(self, work: Work) -> float:
        """2 FLOPs per multiply-add: projections and MLP per token, QK^T and AV per query-key pair."""
        q_o = 2 * self.hidden * self.heads * self.head_dim
        k_v = 2 * self.hidden * self.kv_heads * self.head_dim
        per_token = 2 * (q_o + k_v + 3 * self.hidden * self.intermediate)
        per_pair = 2 * 2 * self.heads * self.head_dim
        return float(self.layers * (per_token * work.tokens + per_pair * work.attention_pairs))


LLAVA_7B = Shape("llava-1.5-7b", layers=32, hidden=4096, heads=32, kv_heads=32, head_dim=128, intermediate=11008)


def _manifest(folder: Path, n: int, joined: int) -> Path:
    """Synthetic images whose caption joins ``joined`` references (2: a ~40-token suffix with the prompt)."""
    source = make_shapes(folder / "synthetic", n)
    lines = []
    for line in source.read_text().splitlines():
        item = json.loads(line)
        item["image"] = str(source.parent / item["image"])
        item["captions"] = [", ".join(item["captions"][:joined])]
        lines.append(json.dumps(item))
    path = folder / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _interleaved_times(fns: dict[str, object], repeats: int) -> dict[str, Timing]:
    """Wall time of each function, alternating them so that both see the same machine load."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            begin = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - begin)
    return {
        name: Timing(statistics.median(t), float(np.percentile(t, 20)), float(np.percentile(t, 80)))
        for name, t in times.items()
    }


def _tokens_ratio(a: int, n: int, suffix: int) -> float:
    """Unpadded token count of naive over shared for every k = 1..n (suffix = fed tokens after the image)."""
    naive = sum(a + k + suffix for k in range(1, n + 1))
    return naive / (a + n + n * suffix)


def main() -> None:
    cli = parser(__doc__)
    cli.add_argument("--images", type=int, default=3)
    cli.add_argument("--batch-size", type=int, default=16)
    cli.add_argument("--repeats", type=int, default=3, help="timed runs per path (median reported)")
    cli.add_argument("--captions", type=int, default=2, help="reference captions joined into the scored one")
    args = cli.parse_args()
    images, repeats = (1, 1) if args.quick else (args.images, args.repeats)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = toy_model_path(SPEC, Path(tmp) / "models")
        adapter = load_adapter(str(model_path)).adapter
        data = load_data(str(_manifest(Path(tmp), images, args.captions)))
        planned = plan_pairs(data, [PROMPT], adapter)
        with torch.inference_mode():
            pairs = [encode_pairs(adapter, load_image(r.image), [p], "cpu")[0] for r, p in zip(data.records, planned)]
    n, a = pairs[0].n_image, pairs[0].image_start
    suffix = pairs[0].n_tokens - pairs[0].prefix_len  # tokens after the image: rest of the prompt + caption
    start, stop = np.arange(1, n + 1), np.full(n, n)

    def run(fn, work: Work | None = None) -> np.ndarray:
        with torch.inference_mode():
            return np.stack(
                [fn(adapter, p, start, stop, shift=True, batch_size=args.batch_size, work=work) for p in pairs]
            )

    paths = {"shared": shared_prefix_losses, "naive": naive_losses}
    works = {name: Work() for name in paths}
    losses = {name: run(fn, works[name]) for name, fn in paths.items()}  # also the warm-up
    contention = Contention()
    timings = _interleaved_times({name: lambda f=fn: run(f) for name, fn in paths.items()}, repeats)
    cfg = adapter.text_config
    heads = cfg.num_attention_heads
    bench_shape = Shape(
        "bench", cfg.num_hidden_layers, cfg.hidden_size, heads, cfg.num_key_value_heads,
        cfg.hidden_size // heads, cfg.intermediate_size,
    )  # fmt: skip
    shape = f"{len(pairs)} images x {n} k, {a} + {n} + {suffix} tokens, batch {args.batch_size}"
    rows, value = [], {}
    for name, work in works.items():
        counts = {
            "decoder_calls": (work.forwards, "calls"),
            "tokens": (work.tokens, "token positions"),
            "attention_pairs": (work.attention_pairs, "query-key pairs"),
            "flops_bench_model": (bench_shape.flops(work), "FLOP"),
            "flops_llava_7b_shapes": (LLAVA_7B.flops(work), "FLOP"),
        }
        for metric, (amount, unit) in counts.items():
            rows.append(Row("ablate-truncate", name, metric, unit, shape, amount, amount, amount, machine(), version()))
            value[name, metric] = amount
        t = timings[name]
        rows.append(Row("ablate-truncate", name, "wall_time", "s", shape, t.median, t.p20, t.p80, machine(), version()))
        value[name, "wall_time"] = t.median
    diff_mean = float(np.abs(losses["shared"].mean(-1) - losses["naive"].mean(-1)).max())
    diff_token = float(np.abs(losses["shared"] - losses["naive"]).max())
    reach = max((s for s in range(1, 2 * n) if _tokens_ratio(a, n, s - 1) >= 10), default=None)
    notes = [
        contention.note(),
        f"max |loss shared - naive|: {diff_mean:.2e} (mean per setting), {diff_token:.2e} (per caption token)",
        f"unpadded token ratio with {suffix} tokens after the image: {_tokens_ratio(a, n, suffix - 1):.2f}x; "
        f"10x needs at most {reach} tokens after the image (the last token is never fed)",
    ]
    print_table(rows)
    print(f"\n{'metric':<24}{'shared prefix':>16}{'naive':>16}{'naive/shared':>14}")
    for metric in dict.fromkeys(m for _, m in value):
        shared, naive = value["shared", metric], value["naive", metric]
        print(f"{metric:<24}{shared:>16.4g}{naive:>16.4g}{naive / shared:>13.2f}x")
    print("\n".join(notes))
    print(f"wrote {write_json('ablate', rows, notes, args.out)}")


if __name__ == "__main__":
    main()
