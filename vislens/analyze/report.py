"""``vislens report``: every analysis of one or more stores on one HTML page."""

from __future__ import annotations

import datetime as _dt
import html
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import xarray as xr

import vislens
from vislens.analyze.common import completeness, label, model_name, require_complete, store_labels

Section = tuple[str, str, dict[str, Path]]
"""(title, explanation, files written)."""


def _stores_table(trees: list[xr.DataTree]) -> pd.DataFrame:
    rows = []
    for tree, name in zip(trees, store_labels(trees)):
        model, data, prompts = tree.attrs.get("model", {}), tree.attrs.get("dataset", {}), tree.attrs.get("prompts", {})
        done, total = completeness(tree)
        rows.append(
            {
                "store": label(tree),
                "shown as": name,
                "model": model_name(tree),
                "architecture": f"{model.get('architecture', '')} ({model.get('n_layers', '?')} layers, "
                f"{model.get('n_heads', '?')} heads / {model.get('n_kv_heads', '?')} kv)",
                "data set": f"{data.get('name', '')} {data.get('split', '')} ({data.get('n_images', '?')} images)",
                "prompt kinds": ", ".join(prompts.get("kinds", [])),
                "samples": f"{done} of {total} done" if done < total else f"all {total} done",
            }
        )
    return pd.DataFrame(rows)


KEYS = {"store", "model", "series", "prompt_kind", "prompt_id", "prompt_text", "layer", "text_tokens"}
COUNTS = {"n_samples", "n_text_samples", "samples_done", "samples_total"}


def _wide(table: pd.DataFrame) -> pd.DataFrame:
    """layer x (metric, series and prompt): every metric of an analysis, each curve in a column."""
    frame = table.copy()
    several = frame["store"].nunique() > 1
    key = frame["prompt_kind"].astype(str)
    if "prompt_id" in frame.columns:
        key = key + ":" + frame["prompt_id"].astype(str)
    frame["curve"] = (frame["series"].astype(str) + " · " + key) if several and "series" in frame else key
    metrics = [
        c for c in frame.columns if c not in KEYS | COUNTS | {"curve"} and pd.api.types.is_numeric_dtype(frame[c])
    ]
    parts = [frame.pivot_table(index="layer", columns="curve", values=m).round(4) for m in metrics]
    return pd.concat(parts, axis=1, keys=metrics)


def _holds(tree: xr.DataTree, hidden: str, result: str) -> bool:
    """Whether a store holds the hidden states, or the named result computed during extraction."""
    if hidden and hidden in tree["activations"].data_vars:
        return True
    return "results" in tree.children and result in tree["results"].children


def _section_html(title: str, text: str, files: dict[str, Path], out: Path) -> str:
    parts = [f"<section><h2>{html.escape(title)}</h2><p>{html.escape(text)}</p>"]
    for name, path in files.items():
        rel = path.relative_to(out) if path.is_relative_to(out) else path
        if name.endswith(".png"):
            parts.append(
                f'<figure><img src="{html.escape(str(rel))}" alt="{html.escape(name)}"><figcaption>{html.escape(name)}</figcaption></figure>'
            )
    for name, path in files.items():
        if name.endswith(".csv"):
            table = pd.read_csv(path)
            by_layer = {"layer", "prompt_kind", "store"} <= set(table.columns)
            shown = _wide(table) if by_layer else table.head(40)
            caption = f"{name}: every metric by layer" if by_layer else f"{name} (first rows)"
            parts.append(
                f'<details open><summary>{html.escape(caption)} · <a href="{html.escape(str(path.relative_to(out)))}">csv</a>'
                f"</summary>{shown.to_html(border=0, classes='table')}</details>"
            )
    return "\n".join(parts) + "</section>"


STUDY = (
    "The study: Wei Houjing, <i>Investigating Multimodal Interaction in Vision Large Language Models</i>, "
    "JAIST master's thesis, 2025. Every definition as vislens implements it: docs/methods.md in the vislens "
    "repository."
)

STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1150px;color:#222}
img{max-width:100%;border:1px solid #ddd} figure{margin:1rem 0}
table.table{border-collapse:collapse;font-size:12px} .table td,.table th{padding:2px 6px;border-bottom:1px solid #eee}
section{margin-bottom:2.5rem} details{margin:.5rem 0}
"""


def write_report(
    trees: list[xr.DataTree],
    out: Path,
    *,
    top_k: int = 1,
    samples: list[str] | None = None,
    text_tokens: str = "instruction",
    by: str = "kind",
    backend: str = "auto",
    progress: bool = False,
    require: bool = False,
) -> Path:
    """Run every analysis the stores support into ``out`` and write ``out/index.html``.

    ``require``: refuse partial stores (else each table and caption says how many samples it covers).
    """
    from vislens.analyze.outputs import write_cosine, write_logit_lens, write_norm_attention

    if require:
        require_complete(trees)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with_acts = [t for t in trees if "activations" in t.children]
    lens_ready = [t for t in with_acts if _holds(t, "hidden", "logit_lens_topk")]
    cosine_ready = [t for t in with_acts if _holds(t, "hidden", "cosine")]
    plan: list[tuple[str, str, Callable[[], dict[str, Path]], list]] = [
        (
            "Logit lens on image tokens (the study's figures 3.1, 3.2)",
            f"Precision (distinct words), token precision (per image token) and recall of the words decoded from "
            f"each image token on its own (top-{top_k}, final norm applied) against the reference captions, per layer "
            "and prompt kind. Definitions: docs/methods.md.",
            lambda: write_logit_lens(lens_ready, out / "logit_lens", top_k=top_k, by=by, progress=progress),
            lens_ready,
        ),
        (
            "Inter-modal cosine similarity (the study's figures 4.1 to 4.4)",
            f"Mean cosine similarity between image-token and {text_tokens}-token hidden states per layer (and within each "
            "modality), per store (e.g. 7B vs 13B) and prompt kind. Definitions: docs/methods.md.",
            lambda: write_cosine(cosine_ready, out / "cosine", text_tokens=text_tokens, by=by, backend=backend),
            cosine_ready,
        ),
    ]
    with_attn = [t for t in with_acts if "attention" in t.children or _holds(t, "", "norm_attention")]
    plan.append(
        (
            "Norm-based attention (the study's figure 4.5)",
            "Share of the text queries' norm-based attention that lands on image tokens per layer; heatmaps of the last "
            "prompt token's norm-based attention (layers x tokens) and the most-attended image tokens in the patch grid.",
            lambda: write_norm_attention(
                with_attn, out / "norm_attention", samples=samples, by=by, backend=backend, progress=progress
            ),
            with_attn,
        )
    )
    ablation = [t for t in trees if "ablation" in t.children]
    if ablation:
        from vislens.analyze.ablation import write_ablation

        plan.append(
            (
                "Image-token ablations (the study's figures 4.6, 4.7)",
                "Caption loss against the number of image tokens kept (with the study's threshold), and per masked "
                "image token or interval.",
                lambda: write_ablation(ablation, out / "ablation"),
                ablation,
            )
        )
    sections: list[Section] = [(title, text, run()) for title, text, run, needed in plan if needed]
    body = "\n".join(_section_html(t, x, f, out) for t, x, f in sections)
    stores = _stores_table(trees).to_html(index=False, border=0, classes="table")
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>vislens report</title><style>{STYLE}</style></head>"
        f"<body><h1>vislens report</h1><p>vislens {vislens.__version__}, {stamp}. {STUDY}</p><h2>Stores</h2>{stores}\n{body}</body></html>"
    )
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
