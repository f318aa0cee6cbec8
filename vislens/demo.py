"""The demo: the whole path on the shipped trained toys, in about a minute on 2 CPU cores."""

from __future__ import annotations

from pathlib import Path

from vislens.ablate import AblateConfig, ablate
from vislens.analyze.outputs import write_cosine
from vislens.analyze.report import write_report
from vislens.extract import ExtractConfig, extract
from vislens.store import open_store
from vislens.toys.trained import trained_toy_path

STORES = {"llava": "store.zarr", "instructblip": "instructblip.zarr"}
"""The store of each trained toy in the demo's folder (the LLaVA toy's is the default one)."""


def run_demo(
    out: Path,
    *,
    n_images: int = 24,
    prompts: tuple[str, ...] = ("normal", "noisy", "empty"),
    families: tuple[str, ...] = ("llava", "instructblip"),
    progress: bool = True,
) -> dict[str, Path]:
    """Extract the trained toys on held-out shapes-world images, ablate, analyse into ``out``.

    For each family: an extraction into ``out/<store>`` (`STORES`) and a truncation ablation
    (caption loss vs image tokens kept) added to the same store. Then ``cosine.csv`` /
    ``cosine.png`` (analysis 2) and ``report/index.html`` (every analysis, the stores side by
    side). Returns the paths written, by name. Rerunning reuses the finished stores.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = f"synthetic:{n_images}"
    written: dict[str, Path] = {}
    for family in families:
        model, store = trained_toy_path(family), out / STORES[family]
        config = ExtractConfig(
            model=str(model),
            data=data,
            out=str(store),
            prompts=tuple(prompts),
            batch_size=8,
            device="cpu",
            progress=progress,
        )
        print(extract(config).summary())
        ablation = AblateConfig(model=str(model), data=data, out=str(store), device="cpu", progress=progress)
        print(ablate(ablation).summary())
        written[f"{family} model"] = model
        written[f"{family} store"] = store
    trees = [open_store(str(out / STORES[f])) for f in families]
    cosine = write_cosine(trees, out)
    return {
        **written,
        "cosine": cosine["cosine.csv"],
        "figure": cosine["cosine.png"],
        "report": write_report(trees, out / "report", progress=progress),
    }
