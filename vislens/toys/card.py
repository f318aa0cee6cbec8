"""The numbers of the toys' model card (docs/toy-model.md), measured, beside random-init twins.

``python -m vislens.toys.card`` measures each shipped trained toy and the same architecture at
random init (with random non-unit norms) on held-out shapes-world scenes, with vislens's own
extraction, analyses and ablation, and rewrites the part of docs/toy-model.md between the
``<!-- card:begin -->`` and ``<!-- card:end -->`` markers (the prose around it is kept). Rerun
it after changing an analysis; a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

BEGIN, END = "<!-- card:begin -->", "<!-- card:end -->"
KINDS = ("normal", "noisy", "empty")


@dataclass
class Measured:
    """One model's numbers. Per-layer frames are indexed by layer with one column per prompt kind."""

    name: str
    caption_f1: float
    example_captions: list[str]
    recall: pd.DataFrame
    precision: pd.DataFrame
    token_precision: pd.DataFrame
    cosine: pd.DataFrame
    image_share: pd.DataFrame
    truncation: pd.Series
    """Mean caption loss by k (image tokens kept), pooled over the ablation's prompts."""
    threshold: float
    full_loss: float
    k_for_70: float
    n_image_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)


def _per_layer(ds: Any, name: str) -> pd.DataFrame:
    table = ds[name].to_dataframe().reset_index().pivot(index="layer", columns="prompt_kind", values=name)
    return table[[k for k in KINDS if k in table.columns]]


def measure(name: str, model: Path, data: Path, work: Path, *, n_caption: int) -> Measured:
    """Caption F1, lens, cosine, norm attention and truncation of one checkpoint on the manifest ``data``."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vislens.ablate import AblateConfig, ablate
    from vislens.analyze import cosine, logit_lens, norm_attention
    from vislens.analyze.ablation import ablation_group, reduction_curve, threshold, tokens_for_reduction
    from vislens.extract import ExtractConfig, extract
    from vislens.store import open_store
    from vislens.toys.evaluate import caption_f1

    loaded = AutoModelForImageTextToText.from_pretrained(model).eval()
    f1, got = caption_f1(loaded, AutoProcessor.from_pretrained(model), n_caption)
    store = work / f"{name}.zarr"
    extract(
        ExtractConfig(
            model=str(model), data=str(data), out=str(store), prompts=KINDS, device="cpu", batch_size=8, progress=False
        )
    )
    ablate(AblateConfig(model=str(model), data=str(data), out=str(store), device="cpu", progress=False))
    tree = open_store(str(store))
    lens = logit_lens(tree)
    precision, token_precision, recall = (_per_layer(lens, v) for v in ("precision", "token_precision", "recall"))
    ablation = ablation_group(tree)
    pooled = reduction_curve(ablation)
    pooled = pooled[pooled.prompt_id == "all"].set_index("k")
    reached = tokens_for_reduction(ablation)
    reached = reached[reached.prompt_id == "all"].iloc[0]
    return Measured(
        name=name,
        caption_f1=f1,
        example_captions=got[:3],
        recall=recall,
        precision=precision,
        token_precision=token_precision,
        cosine=_per_layer(cosine(tree), "inter_modal"),
        image_share=_per_layer(norm_attention(tree), "image_share"),
        truncation=pooled["mean_loss"],
        threshold=threshold(ablation),
        full_loss=float(reached["loss_full"]),
        k_for_70=float(reached["k"]),
        n_image_tokens=int(ablation.attrs["n_image_tokens"]),
    )


def _f(v: float, digits: int = 3) -> str:
    return "nan" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def findings(family: str, t: Measured, r: Measured) -> list[tuple[str, str, bool]]:
    """(finding, measured, reproduced) for each of the study's findings that the toys can show."""
    rec = t.recall["normal"].to_numpy()
    last, best = len(rec) - 1, int(np.argmax(rec))
    out = [
        (
            "captions: held-out greedy-caption word F1 >= 0.8",
            f"{_f(t.caption_f1)} (random init {_f(r.caption_f1)})",
            t.caption_f1 >= 0.8,
        ),
        ("logit lens: recall near zero at the decoder's input (layer 0)", f"layer 0: {_f(rec[0])}", rec[0] < 0.1),
        (
            "logit lens: recall rises with depth (best layer >= 2x layer 0 and >= 0.2)",
            f"best layer {best}: {_f(rec[best])} vs layer 0: {_f(rec[0])}",
            rec[best] >= max(2 * rec[0], 0.2),
        ),
        (
            "logit lens: a small drop in the last layer(s)",
            f"layer {last}: {_f(rec[last])} vs best {_f(rec[best])}",
            best < last and rec[last] < rec[best],
        ),
        (
            "logit lens: above the random-init twin at every layer from the middle on",
            f"random init, best layer: {_f(float(r.recall['normal'].max()))}",
            bool((t.recall["normal"].to_numpy()[len(rec) // 2 :] > r.recall["normal"].max()).all()),
        ),
    ]
    if family == "llava":
        spread = float((t.recall.max(axis=1) - t.recall.min(axis=1)).max())
        out.append(
            (
                "logit lens (LLaVA): the prompt kind barely matters",
                f"largest spread between kinds {_f(spread)}",
                spread < 0.05,
            )
        )
    else:
        mid = len(rec) // 2
        e, n = t.recall["empty"].to_numpy(), t.recall["normal"].to_numpy()
        out.append(
            (
                "logit lens (InstructBLIP): empty prompt best in the middle layers, below normal at the end",
                f"layer {mid}: empty {_f(e[mid])} vs normal {_f(n[mid])}; layer {last}: empty {_f(e[last])} vs "
                f"normal {_f(n[last])}",
                bool(e[mid] > n[mid] and e[last] < n[last]),
            )
        )
    cos = t.cosine["normal"].to_numpy()
    rise = cos[len(cos) // 3 : -1].max() > cos[: max(2, len(cos) // 3)].min()
    out.append(
        (
            "cosine: a rise in the middle-to-late layers and a decline in the last layer",
            f"{' '.join(_f(v, 2) for v in cos)}",
            bool(rise and cos[-1] < cos[:-1].max()),
        )
    )
    share = t.image_share["normal"].to_numpy()
    half = len(share) // 2
    out.append(
        (
            "norm attention: attention to image tokens grows from the middle layers on",
            f"first half {_f(share[:half].mean())}, second half {_f(share[half:].mean())}",
            bool(share[half:].mean() > share[:half].mean()),
        )
    )
    one, full = float(t.truncation.iloc[0]), t.full_loss
    out.append(
        (
            "truncation: caption loss falls as image tokens are added (one token vs all)",
            f"{_f(one)} -> {_f(full)} (random init {_f(float(r.truncation.iloc[0]))} -> {_f(r.full_loss)})",
            one > full + 0.1,
        )
    )
    frac = t.k_for_70 / t.n_image_tokens
    out.append(
        (
            "truncation: ~40% of the image tokens give 70% of the loss reduction",
            f"{_f(t.k_for_70, 0)} of {t.n_image_tokens} tokens ({_f(100 * frac, 0)}%)",
            bool(0.2 <= frac <= 0.6),
        )
    )
    return out


def _layer_table(t: Measured, r: Measured) -> str:
    kinds = list(t.recall.columns)
    head = (
        ["layer"]
        + [f"recall {k}" for k in kinds]
        + [
            "precision",
            "token precision",
            "recall (random)",
            "cosine",
            "cosine (random)",
            "image share",
            "image share (random)",
        ]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for layer in t.recall.index:
        share = t.image_share["normal"].get(layer, np.nan)
        share_r = r.image_share["normal"].get(layer, np.nan)
        row = (
            [str(layer)]
            + [_f(t.recall[k][layer]) for k in kinds]
            + [
                _f(t.precision["normal"][layer]),
                _f(t.token_precision["normal"][layer]),
                _f(r.recall["normal"][layer]),
                _f(t.cosine["normal"][layer]),
                _f(r.cosine["normal"][layer]),
                _f(share),
                _f(share_r),
            ]
        )
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _truncation_table(t: Measured, r: Measured) -> str:
    ks = list(t.truncation.index)
    show = ks if len(ks) <= 12 else sorted({*ks[:4], *ks[3::4], ks[-1]})
    lines = ["| k (image tokens kept) | " + " | ".join(str(k) for k in show) + " |", "|" + "---|" * (len(show) + 1)]
    lines.append("| loss | " + " | ".join(_f(t.truncation[k]) for k in show) + " |")
    lines.append("| loss (random) | " + " | ".join(_f(r.truncation[k]) for k in show) + " |")
    return "\n".join(lines)


def _stages(report: dict[str, Any]) -> str:
    return ", ".join(f"{s['stage']} {s['seconds']:.0f} s (loss {s['final_loss']})" for s in report["stages"])


def render(results: dict[str, tuple[Measured, Measured]], records: dict[str, dict[str, Any]], meta: dict) -> str:
    """The generated part of the card (markdown)."""
    parts = [
        BEGIN,
        f"<!-- written by `python -m vislens.toys.card` on {meta['date']}; {meta['n_images']} held-out scenes x "
        f"{len(KINDS)} prompt kinds for the analyses, {meta['n_caption']} for captions; do not edit by hand -->",
    ]
    for family, (t, r) in results.items():
        rec = records[family]
        report = rec["report"]
        parts += [
            f"\n### {family}: measured\n",
            f"Training: {_stages(report)}; {report['total_seconds']:.0f} s in all, as recorded in `vislens_toy.json` "
            "(shared machine: see above).",
            f'Held-out greedy captions ({meta["n_caption"]} scenes, prompt "Briefly describe the content of the '
            f'image:"): word F1 **{_f(t.caption_f1)}** (random init {_f(r.caption_f1)}); e.g. '
            + "; ".join(f'"{c}"' for c in t.example_captions[:2])
            + ".",
            f"Logit lens (`vislens analyze logit-lens`, top-1): layer 0 is the decoder's input; layer "
            f"{len(t.recall) - 1} its output.\n",
            _layer_table(t, r),
            "\nTruncation (caption loss vs the first k image tokens kept, mean over the 5 ablation prompts):\n",
            _truncation_table(t, r),
            f"\nThreshold (the study's line, mean over all settings): {_f(t.threshold)} (random init "
            f"{_f(r.threshold)}); loss with every image token {_f(t.full_loss)}; 70% of the loss reduction with "
            f"{_f(t.k_for_70, 0)} of {t.n_image_tokens} tokens.\n",
            "| finding of the study | measured | reproduced |",
            "|---|---|---|",
        ]
        parts += [f"| {name} | {value} | {'yes' if ok else 'no'} |" for name, value, ok in findings(family, t, r)]
    parts.append(END)
    return "\n".join(parts)


def write_card(doc: Path, block: str) -> None:
    """Replace the generated block of ``doc`` (or append it when the markers are missing)."""
    text = doc.read_text() if doc.exists() else ""
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def main(argv: list[str] | None = None) -> int:
    """Measure the shipped trained toys and their random-init twins; rewrite the card's numbers."""
    import transformers

    from vislens.toys.shapes import make_shapes
    from vislens.toys.train import random_init_toy
    from vislens.toys.trained import TRAINED_FAMILIES, trained_toy_path, trained_toy_record

    parser = argparse.ArgumentParser(prog="python -m vislens.toys.card", description=__doc__.split("\n\n")[0])
    parser.add_argument("--doc", default="docs/toy-model.md", help="the card to update")
    parser.add_argument("--n", type=int, default=48, help="held-out scenes for the analyses and the ablation")
    parser.add_argument("--n-caption", type=int, default=200, help="held-out scenes for the caption F1")
    parser.add_argument("--families", default=",".join(TRAINED_FAMILIES), help="comma-separated")
    parser.add_argument("--json", help="also write every number here")
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()
    start = time.perf_counter()
    results, records = {}, {}
    with tempfile.TemporaryDirectory(prefix="vislens-card-") as tmp:
        work = Path(tmp)
        data = make_shapes(work / "data", args.n, split="test")
        for family in args.families.split(","):
            twin = work / f"random-{family}"
            model, processor = random_init_toy(family)
            model.save_pretrained(twin)
            processor.save_pretrained(twin)
            trained = measure(f"{family}-trained", trained_toy_path(family), data, work, n_caption=args.n_caption)
            random = measure(f"{family}-random", twin, data, work, n_caption=args.n_caption)
            results[family], records[family] = (trained, random), trained_toy_record(family)
            print(f"{family}: measured in {time.perf_counter() - start:.0f} s")
    meta = {"date": time.strftime("%Y-%m-%d"), "n_images": args.n, "n_caption": args.n_caption}
    write_card(Path(args.doc), render(results, records, meta))
    if args.json:
        dump = {
            family: {
                m.name: {
                    "caption_f1": m.caption_f1,
                    "recall": m.recall.to_dict(),
                    "precision": m.precision.to_dict(),
                    "token_precision": m.token_precision.to_dict(),
                    "cosine": m.cosine.to_dict(),
                    "image_share": m.image_share.to_dict(),
                    "truncation": m.truncation.to_dict(),
                    "threshold": m.threshold,
                    "full_loss": m.full_loss,
                    "k_for_70": m.k_for_70,
                }
                for m in pair
            }
            for family, pair in results.items()
        }
        Path(args.json).write_text(json.dumps(dump, indent=1, default=str))
    for family, (t, r) in results.items():
        for name, value, ok in findings(family, t, r):
            print(f"{family:>12} {'yes' if ok else 'no ':>3}  {name}: {value}")
    print(f"card written to {args.doc} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
