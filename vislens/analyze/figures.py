"""Figures of the study, drawn with matplotlib (Agg) from the analyses' tables."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

MARKERS = "osD^vP*Xh<>"
LINESTYLES = ("-", "--", "-.", ":")


def _series(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(legend label, rows) of each line: one per store (model and short path, when several) and
    prompt kind or prompt (kind:id)."""
    several = table["store"].nunique() > 1
    store_name = table["series"] if "series" in table.columns else table["store"]
    if "prompt_id" in table.columns:
        key = table["prompt_kind"].astype(str) + ":" + table["prompt_id"].astype(str)
    else:
        key = table["prompt_kind"].astype(str)
    labels = (store_name.astype(str) + " · " + key) if several else key
    return [(name, rows) for name, rows in table.assign(_label=labels).groupby("_label", sort=True)]


def plot_lines(
    table: pd.DataFrame,
    columns: list[str],
    path: str | Path,
    *,
    ylabel: str,
    titles: list[str] | None = None,
    note: str = "",
) -> Path:
    """One panel per column: value vs layer, one line per (store, prompt kind or prompt)."""
    path = Path(path)
    fig, axes = plt.subplots(1, len(columns), figsize=(5.2 * len(columns), 3.8 + (0.3 if note else 0)), squeeze=False)
    for ax, column, title in zip(axes[0], columns, titles or columns):
        for i, (name, rows) in enumerate(_series(table)):
            ax.plot(  # markers and dash styles keep coinciding lines visible
                rows["layer"],
                rows[column],
                marker=MARKERS[i % len(MARKERS)],
                markersize=4,
                markerfacecolor="none",
                linestyle=LINESTYLES[i % len(LINESTYLES)],
                label=name,
            )
        ax.set_xlabel("layer (0 = embeddings, l = output of decoder layer l)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, color="#555")
    fig.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_cosine(table: pd.DataFrame, path: str | Path, *, note: str = "") -> Path:
    """Figures 4.1-4.4 of the study: inter-modal (and intra-modal) cosine similarity vs layer."""
    text = str(table["text_tokens"].iloc[0]) if "text_tokens" in table.columns and len(table) else "text"
    return plot_lines(
        table,
        ["inter_modal", "intra_image", "intra_text"],
        path,
        ylabel="mean cosine similarity",
        titles=[f"image vs {text} tokens", "image vs image tokens", f"{text} vs {text} tokens"],
        note=note,
    )


def plot_logit_lens(table: pd.DataFrame, path: str | Path, *, note: str = "") -> Path:
    """Figures 3.1/3.2 of the study: precision, token precision and recall of image-token words vs layer."""
    return plot_lines(
        table,
        ["precision", "token_precision", "recall"],
        path,
        ylabel="score",
        titles=["precision (distinct words)", "token precision (per image token)", "recall (distinct words)"],
        note=note,
    )


def plot_image_share(table: pd.DataFrame, path: str | Path, *, note: str = "") -> Path:
    """Share of text queries' norm-based attention that lands on image tokens, vs layer."""
    return plot_lines(
        table,
        ["image_share", "image_share_after_image"],
        path,
        ylabel="share of norm-based attention",
        titles=["text queries -> image tokens", "text queries after the image -> image tokens"],
        note=note,
    )


def plot_heatmap(
    heat: np.ndarray,
    path: str | Path,
    *,
    title: str,
    image_span: tuple[int, int] | None = None,
    layers: np.ndarray | None = None,
) -> Path:
    """Figure 4.5 of the study: norm-based attention of the last prompt token, layers x tokens.

    ``layers`` are the row labels (decoder layers 1 .. L); rows are numbered from 0 without them.
    """
    path = Path(path)
    layers = np.arange(heat.shape[0]) if layers is None else np.asarray(layers)
    fig, ax = plt.subplots(figsize=(9, 3.6))
    extent = (-0.5, heat.shape[1] - 0.5, float(layers[0]) - 0.5, float(layers[-1]) + 0.5)
    im = ax.imshow(heat, aspect="auto", cmap="viridis", interpolation="nearest", origin="lower", extent=extent)
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if image_span is not None:
        for x in image_span:
            ax.axvline(x - 0.5, color="white", linewidth=0.8, linestyle="--")
    ax.set_xlabel("token position (dashed: image tokens)")
    ax.set_ylabel("layer (decoder layer l)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="norm-based attention")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_grid(values: np.ndarray, path: str | Path, *, title: str, image: str | None = None, label: str = "") -> Path:
    """Norm-based attention over the image-token patch grid (rows x cols), drawn over the image.

    ``image`` (a path) is shown underneath when the file can be read: centre-cropped to a square
    for a square grid (as CLIP-style processors crop), else resized to the grid; ``label`` names
    the colour bar.
    """
    path = Path(path)
    rows, cols = values.shape
    fig, ax = plt.subplots(figsize=(4.4, 3.8))
    picture = _picture(image, rows, cols)
    extent = (-0.5, cols - 0.5, rows - 0.5, -0.5)
    if picture is not None:
        ax.imshow(picture, extent=extent, interpolation="bilinear")
    im = ax.imshow(
        values, cmap="magma", interpolation="nearest", extent=extent, alpha=0.6 if picture is not None else 1
    )
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("patch column")
    ax.set_ylabel("patch row")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.colorbar(im, ax=ax, label=label or "norm-based attention")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _picture(image: str | None, rows: int, cols: int) -> np.ndarray | None:
    """The image as the patch grid sees it, or None when it cannot be read here."""
    if not image:
        return None
    try:
        from PIL import Image

        with Image.open(image) as opened:
            picture = opened.convert("RGB")
    except (OSError, ValueError):
        return None
    if rows == cols:
        side = min(picture.size)
        left, top = (picture.width - side) // 2, (picture.height - side) // 2
        picture = picture.crop((left, top, left + side, top + side))
    return np.asarray(picture)
