"""The demo: the whole path on the embedded default, in about a minute on 2 CPU cores."""

from __future__ import annotations

from pathlib import Path

from vislens.analyze.cosine import cosine_table
from vislens.analyze.figures import plot_cosine
from vislens.extract import ExtractConfig, extract, toy_model_path
from vislens.store import open_store


def run_demo(
    out: Path, *, n_images: int = 24, prompts: tuple[str, ...] = ("normal", "noisy", "empty"), progress: bool = True
) -> dict[str, Path]:
    """Build the toy model and data, extract into ``out/store.zarr``, analyse into ``out``.

    Returns the paths written, by name. Rerunning reuses the finished store.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = toy_model_path()
    store = out / "store.zarr"
    config = ExtractConfig(
        model=str(model),
        data=f"synthetic:{n_images}",
        out=str(store),
        prompts=tuple(prompts),
        batch_size=8,
        device="cpu",
        progress=progress,
    )
    print(extract(config).summary())
    tree = open_store(str(store))
    table = cosine_table([tree])
    table.to_csv(out / "cosine.csv", index=False)
    plot_cosine(table, out / "cosine.png")
    return {"model": model, "store": store, "cosine": out / "cosine.csv", "figure": out / "cosine.png"}
