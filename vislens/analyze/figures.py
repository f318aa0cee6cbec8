"""Figures of the study, drawn with matplotlib (Agg) from the analyses' tables."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _series_label(row_store: str, kind: str, several_stores: bool) -> str:
    return f"{Path(row_store.rstrip('/')).name or row_store} · {kind}" if several_stores else kind


def plot_lines(
    table: pd.DataFrame, columns: list[str], path: str | Path, *, ylabel: str, titles: list[str] | None = None
) -> Path:
    """One panel per column: value vs layer, one line per (store, prompt kind)."""
    path = Path(path)
    several = table["store"].nunique() > 1
    fig, axes = plt.subplots(1, len(columns), figsize=(5.2 * len(columns), 3.8), squeeze=False)
    for ax, column, title in zip(axes[0], columns, titles or columns):
        for (store, kind), rows in table.groupby(["store", "prompt_kind"], sort=True):
            ax.plot(rows["layer"], rows[column], marker="o", markersize=3, label=_series_label(store, kind, several))
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_cosine(table: pd.DataFrame, path: str | Path) -> Path:
    """Figures 4.1-4.4: inter-modal (and intra-modal) cosine similarity vs layer."""
    return plot_lines(
        table,
        ["inter_modal", "intra_image", "intra_text"],
        path,
        ylabel="mean cosine similarity",
        titles=["image vs text tokens", "image vs image tokens", "text vs text tokens"],
    )


def plot_logit_lens(table: pd.DataFrame, path: str | Path) -> Path:
    """Figures 3.1/3.2: precision and recall of decoded image-token words vs layer."""
    return plot_lines(table, ["precision", "recall"], path, ylabel="score", titles=["precision", "recall"])


def plot_image_share(table: pd.DataFrame, path: str | Path) -> Path:
    """Share of text queries' norm-based attention that lands on image tokens, vs layer."""
    return plot_lines(
        table,
        ["image_share", "image_share_after_image"],
        path,
        ylabel="share of norm-based attention",
        titles=["text queries -> image tokens", "text queries after the image -> image tokens"],
    )


def plot_heatmap(heat: np.ndarray, path: str | Path, *, title: str, image_span: tuple[int, int] | None = None) -> Path:
    """Figure 4.5: norm-based attention of the last prompt token, layers x tokens."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(9, 3.6))
    im = ax.imshow(heat, aspect="auto", cmap="viridis", interpolation="nearest", origin="lower")
    if image_span is not None:
        for x in image_span:
            ax.axvline(x - 0.5, color="white", linewidth=0.8, linestyle="--")
    ax.set_xlabel("token position (dashed: image tokens)")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="norm-based attention")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_grid(values: np.ndarray, path: str | Path, *, title: str) -> Path:
    """Norm-based attention over the image-token patch grid (rows x cols)."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(4, 3.6))
    im = ax.imshow(values, cmap="magma", interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("patch column")
    ax.set_ylabel("patch row")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
