"""Figures of the study, drawn with matplotlib (Agg) from the analyses' tables."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
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
