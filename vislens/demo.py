"""The demo: the whole path on the embedded default, in about a minute on 2 CPU cores."""

from __future__ import annotations

from pathlib import Path

from vislens.analyze.outputs import write_cosine
from vislens.analyze.report import write_report
from vislens.extract import ExtractConfig, extract
from vislens.store import open_store
from vislens.toys import toy_model_path


def run_demo(
    out: Path, *, n_images: int = 24, prompts: tuple[str, ...] = ("normal", "noisy", "empty"), progress: bool = True
) -> dict[str, Path]:
    """Build the toy model and data, extract into ``out/store.zarr``, analyse into ``out``.

    Writes ``cosine.csv``/``cosine.png`` (analysis 2) and ``report/index.html`` (every
    analysis). Returns the paths written, by name. Rerunning reuses the finished store.
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
    trees = [open_store(str(store))]
    written = write_cosine(trees, out)
    report = write_report(trees, out / "report", progress=progress)
    return {
        "model": model,
        "store": store,
        "cosine": written["cosine.csv"],
        "figure": written["cosine.png"],
        "report": report,
    }
