"""The numbers of the toys' model card (docs/toy-model.md), measured, beside random-init twins.

``python -m vislens.toys.card`` measures each shipped trained toy and the same architecture at
random init (with random non-unit norms) on held-out shapes-world scenes, with vislens's own
extraction, analyses and ablation, and rewrites the part of docs/toy-model.md between the
``<!-- card:begin -->`` and ``<!-- card:end -->`` markers (the prose around it is kept). Rerun
it after changing an analysis; a few minutes on 2 CPU cores.

Every finding of the study is judged by a criterion that can fail, on a statistic with a 95%
bootstrap interval over the held-out scenes (`bootstrap`, seeded): it counts as reproduced only
when the whole interval meets the criterion. A claim that holds by construction on a toy
(LLaVA's "the prompt kind barely matters": its image tokens precede the prompt in a causal
decoder) is listed apart and never counted.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

BEGIN, END = "<!-- card:begin -->", "<!-- card:end -->"
KINDS = ("normal", "noisy", "empty")
BOOTSTRAP = 2000
"""Bootstrap resamples of the scenes behind every interval."""
LEVEL = 0.95
SEED = 0
STUDY_REDUCTION = (0.4, 0.7, 0.1)
"""The study's "40% of the image tokens give 70% of the total loss reduction", and the tolerance
(in reduction, either side) within which the card counts it reproduced."""


@dataclass
class Measured:
    """One model's numbers: per-scene arrays (for the intervals) and their means (for the tables).

    Per-layer frames are indexed by layer with one column per prompt kind. ``per_scene`` holds
    (scene, kind, layer) arrays ``recall``, ``precision``, ``token_precision``, ``cosine`` (layers
    0 .. L) and ``image_share`` (attention layers 1 .. L), and ``loss`` (scene, prompt, k) and
    ``full_loss`` (scene, prompt) of the truncation, scene-aligned (the same held-out scenes in
    the same order for the trained toy and its twin); ``caption_f1`` (caption scene,).
    """

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
    per_scene: dict[str, np.ndarray] = field(default_factory=dict)
    ks: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    extra: dict[str, Any] = field(default_factory=dict)


def _per_layer(ds: Any, name: str) -> pd.DataFrame:
    table = ds[name].to_dataframe().reset_index().pivot(index="layer", columns="prompt_kind", values=name)
    return table[[k for k in KINDS if k in table.columns]]


def _by_scene(ds: Any, name: str) -> np.ndarray:
    """(scene, kind, layer) float64 of a per-sample (sample, layer) variable; scenes in order of first
    appearance, NaN where a scene lacks a kind."""
    images = list(dict.fromkeys(str(v) for v in ds["image_id"].values))
    row = {image: i for i, image in enumerate(images)}
    out = np.full((len(images), len(KINDS), ds.sizes["layer"]), np.nan)
    values = np.asarray(ds[name].values, dtype=np.float64)
    for s, (image, kind) in enumerate(zip(ds["image_id"].values, ds["prompt_kind"].values, strict=True)):
        out[row[str(image)], KINDS.index(str(kind))] = values[s]
    return out


def measure(name: str, model: Path, data: Path, work: Path, *, n_caption: int) -> Measured:
    """Caption F1, lens, cosine, norm attention and truncation of one checkpoint on the manifest ``data``."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vislens.ablate import AblateConfig, ablate
    from vislens.analyze import cosine, cosine_per_sample, logit_lens, norm_attention
    from vislens.analyze.ablation import ablation_group, reduction_curve, threshold, tokens_for_reduction
    from vislens.analyze.logit_lens import logit_lens_per_sample
    from vislens.analyze.norm_attention import norm_attention_per_sample
    from vislens.extract import ExtractConfig, extract
    from vislens.store import DONE, open_store
    from vislens.toys.evaluate import greedy_captions, held_out, word_f1

    loaded = AutoModelForImageTextToText.from_pretrained(model).eval()
    images, refs = held_out(n_caption)
    got = greedy_captions(loaded, AutoProcessor.from_pretrained(model), images)
    f1 = np.array([word_f1(g, r) for g, r in zip(got, refs, strict=True)])
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
    lens_samples = logit_lens_per_sample(tree)
    per_scene = {v: _by_scene(lens_samples, v) for v in ("recall", "precision", "token_precision")}
    per_scene["cosine"] = _by_scene(cosine_per_sample(tree).compute(), "inter_modal")
    per_scene["image_share"] = _by_scene(norm_attention_per_sample(tree).compute(), "image_share")
    done = ablation["done"].load() == DONE  # (sample, prompt): pairs not done are NaN
    per_scene["loss"] = ablation["loss"].astype("float64").where(done).transpose("sample", "prompt", "k").values
    per_scene["full_loss"] = ablation["full_loss"].astype("float64").where(done).transpose("sample", "prompt").values
    per_scene["caption_f1"] = f1
    return Measured(
        name=name,
        caption_f1=float(f1.mean()),
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
        per_scene=per_scene,
        ks=ablation["k"].values.astype(int),
    )


def _sentence(text: str) -> str:
    """``text`` with its first letter upper-case (the rest kept: ``LLaVA``)."""
    return text[:1].upper() + text[1:]


def _f(v: float, digits: int = 3) -> str:
    return "nan" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


@dataclass(frozen=True)
class Interval:
    """A statistic on all scenes and its bootstrap percentile interval over scenes (`LEVEL`)."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{_f(self.value)} [{_f(self.low)}, {_f(self.high)}]"


def bootstrap(statistic: Any, n: int, *, reps: int = BOOTSTRAP, seed: int = SEED, level: float = LEVEL) -> Interval:
    """A statistic of the ``n`` scenes and its percentile interval over ``reps`` resamples of the
    scenes with replacement (seeded).

    ``statistic(rows)`` takes scene indices of shape (resamples, n) and returns one value per
    resample; the value reported is that of all scenes. Resamples whose statistic is not finite
    are left out of the percentiles.
    """
    rng = np.random.default_rng(seed)
    value = float(np.asarray(statistic(np.arange(n)[None]))[0])
    draws = np.concatenate(
        [
            np.asarray(statistic(rng.integers(0, n, (min(256, reps - done), n))), dtype=np.float64)
            for done in range(0, reps, 256)
        ]
    )
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return Interval(value, np.nan, np.nan)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Interval(value, float(low), float(high))


@dataclass(frozen=True)
class Finding:
    """One of the study's findings measured on a toy: the criterion, the interval, the verdict.

    ``can_fail`` is False for a claim that holds by construction on this toy (listed apart).
    """

    claim: str
    criterion: str
    measured: str
    reproduced: bool
    can_fail: bool = True


def _mean(a: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Mean over the scenes ``rows`` (resamples, n) of a (scene, ...) array, NaN-aware: (resamples, ...)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells (the empty prompt's cosine) stay NaN
        return np.nanmean(a[rows], axis=1)


def _reduction(loss: np.ndarray, full: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(resamples, k) share of the total loss reduction (`vislens.analyze.ablation.reduction_curve`,
    pooled: mean over scenes, then over prompts)."""
    curve = _mean(loss, rows).mean(1)  # (resamples, k)
    full_loss = _mean(full, rows).mean(1)  # (resamples,)
    total = curve[:, 0] - full_loss
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total[:, None] > 0, (curve[:, :1] - curve) / total[:, None], np.nan)


def findings(family: str, t: Measured, r: Measured) -> list[Finding]:
    """Each of the study's findings that the toys can show, with a 95% bootstrap interval over scenes
    and a criterion that can fail (docs/toy-model.md says why each criterion is what it is)."""
    ps, rs = t.per_scene, r.per_scene
    n = ps["recall"].shape[0]
    normal = KINDS.index("normal")
    rec = ps["recall"][:, normal]  # (scene, layer)
    mean_rec = np.nanmean(rec, 0)
    last = rec.shape[1] - 1
    best = int(np.argmax(mean_rec))
    out = []

    f1 = bootstrap(lambda rows: ps["caption_f1"][rows].mean(1), ps["caption_f1"].size)
    out.append(
        Finding(
            "captions: held-out greedy-caption word F1",
            "interval above 0.8",
            f"{f1} (random init {_f(r.caption_f1)})",
            f1.low > 0.8,
        )
    )
    first = bootstrap(lambda rows: _mean(rec, rows)[:, 0], n)
    out.append(
        Finding(
            "logit lens: recall near zero at the decoder's input (layer 0)",
            "interval below 0.1",
            str(first),
            first.high < 0.1,
        )
    )

    def ratio_of(rows: np.ndarray) -> np.ndarray:
        m = _mean(rec, rows)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(m[:, 0] > 0, m[:, best] / m[:, 0], np.inf)

    ratio = bootstrap(ratio_of, n)
    out.append(
        Finding(
            "logit lens: recall rises with depth",
            f"best layer ({best}) / layer 0: interval above 2",
            f"{ratio} (layer {best}: {_f(mean_rec[best])}, layer 0: {_f(mean_rec[0])})",
            ratio.low > 2,
        )
    )
    peak = int(np.argmax(mean_rec[:last]))
    drop = bootstrap(lambda rows: (lambda m: m[:, peak] - m[:, last])(_mean(rec, rows)), n)
    out.append(
        Finding(
            "logit lens: a small drop in the last layer",
            f"best earlier layer ({peak}) - last layer ({last}): interval above 0",
            str(drop),
            drop.low > 0,
        )
    )
    mid = last // 2
    twin = rs["recall"][:, normal]
    above = bootstrap(lambda rows: _mean(rec, rows)[:, mid:].min(1) - _mean(twin, rows).max(1), n)
    out.append(
        Finding(
            "logit lens: above the random-init twin at every layer from the middle on",
            f"lowest trained recall, layers {mid}..{last}, - highest random-init recall: interval above 0",
            f"{above} (random init, best layer: {_f(float(np.nanmean(twin, 0).max()))})",
            above.low > 0,
        )
    )
    kinds = ps["recall"]  # (scene, kind, layer)
    if family == "llava":
        spread = bootstrap(lambda rows: np.ptp(_mean(kinds, rows), axis=1).max(1), n)
        out.append(
            Finding(
                "logit lens (LLaVA): the prompt kind barely matters",
                "none: holds by construction here (LLaVA's image tokens precede the prompt in a causal decoder, "
                "so their states cannot depend on it)",
                f"largest spread between kinds {spread}",
                bool(spread.value < 0.05),
                can_fail=False,
            )
        )
    else:
        middle = np.arange(max(1, round(last / 3)), round(2 * last / 3) + 1)
        empty, noisy = KINDS.index("empty"), KINDS.index("noisy")

        def empty_lead(rows: np.ndarray) -> np.ndarray:
            m = _mean(kinds, rows)[:, :, middle]  # (resamples, kind, layer)
            return (m[:, empty] - np.maximum(m[:, normal], m[:, noisy])).mean(1)

        lead = bootstrap(empty_lead, n)
        lag = bootstrap(lambda rows: (lambda m: m[:, normal, last] - m[:, empty, last])(_mean(kinds, rows)), n)
        out.append(
            Finding(
                "logit lens (InstructBLIP): empty prompt best in the middle layers, below normal at the end",
                f"empty - best other kind, layers {middle[0]}..{middle[-1]}, and normal - empty, layer {last}: "
                "both intervals above 0",
                f"middle {lead}; last layer {lag}",
                lead.low > 0 and lag.low > 0,
            )
        )
    cos = ps["cosine"][:, normal]
    mean_cos = np.nanmean(cos, 0)
    top = int(np.argmax(mean_cos[:last]))
    early = int(np.argmin(mean_cos[: max(2, last // 3 + 1)]))
    rise = bootstrap(lambda rows: (lambda m: m[:, top] - m[:, early])(_mean(cos, rows)), n)
    decline = bootstrap(lambda rows: (lambda m: m[:, top] - m[:, last])(_mean(cos, rows)), n)
    out.append(
        Finding(
            "cosine: a rise in the middle-to-late layers and a decline in the last layer",
            f"peak before the last layer (layer {top}, at least layer {last // 3}) - early minimum (layer {early}), "
            f"and peak - last layer (final-normed): both intervals above 0",
            f"rise {rise}; decline {decline} (per layer: {' '.join(_f(v, 2) for v in mean_cos)})",
            top >= last // 3 and rise.low > 0 and decline.low > 0,
        )
    )
    share = ps["image_share"][:, normal]
    valid = np.flatnonzero(np.isfinite(share).any(0))  # attention layers 1 .. L
    half = valid.size // 2
    grow = bootstrap(
        lambda rows: (lambda m: m[:, valid[half:]].mean(1) - m[:, valid[:half]].mean(1))(_mean(share, rows)), n
    )
    out.append(
        Finding(
            "norm attention: attention to image tokens grows from the middle layers on",
            "mean image share, second half of the layers - first half: interval above 0",
            str(grow),
            grow.low > 0,
        )
    )
    loss, full = ps["loss"], ps["full_loss"]
    fall = bootstrap(lambda rows: _mean(loss, rows).mean(1)[:, 0] - _mean(full, rows).mean(1), n)
    out.append(
        Finding(
            "truncation: caption loss falls as image tokens are added",
            f"loss with {t.ks[0]} token - loss with all: interval above 0",
            f"{fall} (random init {_f(float(r.truncation.iloc[0]))} -> {_f(r.full_loss)})",
            fall.low > 0,
        )
    )
    share_k, target, tolerance = STUDY_REDUCTION
    j = int(np.searchsorted(t.ks, int(round(share_k * t.n_image_tokens))))
    reduction = bootstrap(lambda rows: _reduction(loss, full, rows)[:, j], n)
    out.append(
        Finding(
            "truncation: 40% of the image tokens give 70% of the total loss reduction",
            f"reduction with {t.ks[j]} of {t.n_image_tokens} tokens: interval within "
            f"{_f(target - tolerance, 2)}..{_f(target + tolerance, 2)}",
            f"{reduction} (70% reached with {_f(t.k_for_70, 0)} tokens, {_f(100 * t.k_for_70 / t.n_image_tokens, 0)}%)",
            target - tolerance <= reduction.low and reduction.high <= target + tolerance,
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
        ]
        found = findings(family, t, r)
        parts += [
            f"Findings of the study: the statistic on all {t.per_scene['recall'].shape[0]} scenes and its "
            f"{round(100 * LEVEL)}% bootstrap interval over scenes ({BOOTSTRAP} resamples, seed {SEED}); "
            "reproduced only when the interval meets the criterion.\n",
            "| finding of the study | criterion | measured [95% interval] | reproduced |",
            "|---|---|---|---|",
        ]
        parts += [
            f"| {f.claim} | {f.criterion} | {f.measured} | {'yes' if f.reproduced else 'no'} |"
            for f in found
            if f.can_fail
        ]
        fixed = [f for f in found if not f.can_fail]
        if fixed:
            parts += ["\nClaims that cannot fail on this toy (not counted as reproduced):\n"]
            parts += [f"- {f.claim}: {f.measured}. {_sentence(f.criterion.removeprefix('none: '))}." for f in fixed]
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
        for f in findings(family, t, r):
            verdict = ("yes" if f.reproduced else "no") if f.can_fail else "n/a"
            print(f"{family:>12} {verdict:>3}  {f.claim}: {f.measured}")
    print(f"card written to {args.doc} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
