"""Each analysis as files: a CSV table and its figures in a folder (what the CLI and report call)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from vislens.analyze import figures
from vislens.analyze.common import coverage, group, label, require_complete, short_labels, store_labels
from vislens.analyze.cosine import cosine_table
from vislens.analyze.logit_lens import logit_lens_table
from vislens.analyze.norm_attention import last_query_heatmap, norm_attention_table, pick_samples, top_image_tokens
from vislens.store import IMAGE

METHODS_NOTE = "definitions: docs/methods.md (vislens)"


def _note(trees: list[xr.DataTree], text: str) -> str:
    """A figure caption: what is plotted, and how many samples of each store it covers."""
    covered = "; ".join(f"{name}: {coverage(tree)}" for name, tree in zip(store_labels(trees), trees))
    return f"{text}\n{covered}"


def write_cosine(
    trees: list[xr.DataTree],
    out: Path,
    *,
    text_tokens: str = "instruction",
    by: str = "kind",
    backend: str = "auto",
    require: bool = False,
) -> dict[str, Path]:
    """``cosine.csv`` and ``cosine.png``; ``require``: refuse partial stores."""
    if require:
        require_complete(trees)
    out.mkdir(parents=True, exist_ok=True)
    table = cosine_table(trees, text_tokens=text_tokens, by=by, backend=backend)
    table.to_csv(out / "cosine.csv", index=False)
    per = "prompt" if by == "prompt" else "prompt kind"
    note = _note(trees, f"text tokens: {text_tokens}; mean over samples per {per}; {METHODS_NOTE}")
    return {"cosine.csv": out / "cosine.csv", "cosine.png": figures.plot_cosine(table, out / "cosine.png", note=note)}


def write_logit_lens(
    trees: list[xr.DataTree],
    out: Path,
    *,
    top_k: int = 1,
    by: str = "kind",
    cache: bool = True,
    progress: bool = False,
    require: bool = False,
) -> dict[str, Path]:
    """``logit_lens.csv`` and ``logit_lens.png``; ``require``: refuse partial stores."""
    if require:
        require_complete(trees)
    out.mkdir(parents=True, exist_ok=True)
    table = logit_lens_table(trees, top_k=top_k, by=by, cache=cache, progress=progress)
    table.to_csv(out / "logit_lens.csv", index=False)
    note = _note(trees, f"top-{top_k} words of each image token, decoded one token at a time; {METHODS_NOTE}")
    return {
        "logit_lens.csv": out / "logit_lens.csv",
        "logit_lens.png": figures.plot_logit_lens(table, out / "logit_lens.png", note=note),
    }


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "store"


def write_norm_attention(
    trees: list[xr.DataTree],
    out: Path,
    *,
    samples: list[str] | None = None,
    top: int = 10,
    by: str = "kind",
    backend: str = "auto",
    progress: bool = False,
    require: bool = False,
) -> dict[str, Path]:
    """``norm_attention.csv`` (image share per layer), its figure, and per chosen sample a
    layers x tokens heatmap, a patch-grid map (last layer) and ``top_image_tokens.csv``."""
    if require:
        require_complete(trees)
    out.mkdir(parents=True, exist_ok=True)
    table = norm_attention_table(trees, by=by, backend=backend, progress=progress)
    table.to_csv(out / "norm_attention.csv", index=False)
    note = _note(trees, f"decoder layers 1 .. L; {METHODS_NOTE}")
    written = {
        "norm_attention.csv": out / "norm_attention.csv",
        "norm_attention.png": figures.plot_image_share(table, out / "norm_attention.png", note=note),
    }
    tops = []
    names = store_labels(trees)
    for tree, name, short in zip(trees, names, short_labels([label(t) for t in trees])):
        stem = _slug(short)  # distinct per store, even for folders of the same name
        acts = group(tree, "activations")
        caps = group(tree, "captions")
        chosen = pick_samples(tree, samples)
        top_table = top_image_tokens(tree, chosen, top=top, backend=backend)
        tops.append(top_table)
        for s in chosen:
            heat = last_query_heatmap(tree, s, backend=backend)
            image_pos = np.flatnonzero(acts["modality"].sel(sample=s).values == IMAGE)
            span = (int(image_pos[0]), int(image_pos[-1]) + 1) if image_pos.size else None
            title = f"{name}: {heat.attrs['image_id']} ({heat.attrs['prompt_kind']} prompt, sample {s})"
            file = f"heatmap_{stem}_{s}.png"
            written[file] = figures.plot_heatmap(
                heat.values, out / file, title=title, image_span=span, layers=heat["layer"].values
            )
            rows, cols = (int(v) for v in acts["image_grid"].sel(sample=s).values)
            if rows * cols == image_pos.size and image_pos.size:
                last = int(heat["layer"].values[-1])
                grid = heat.values[-1, image_pos].reshape(rows, cols)
                index = int(acts["image_index"].sel(sample=s))
                picture = str(caps["image_path"].values[index]) if "image_path" in caps else None
                file = f"grid_{stem}_{s}.png"
                written[file] = figures.plot_grid(
                    grid,
                    out / file,
                    title=f"{title}\nlayer {last}, image tokens",
                    image=picture,
                    label=f"norm-based attention of the last prompt token (layer {last})",
                )
    pd.concat(tops, ignore_index=True).to_csv(out / "top_image_tokens.csv", index=False)
    written["top_image_tokens.csv"] = out / "top_image_tokens.csv"
    return written
