"""Data sets: turn a ``--data`` spec into image records.

Specs: a JSONL manifest path; ``synthetic`` or ``synthetic:N`` (the embedded shapes set).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vislens.errors import DataError
from vislens.extract.datasets.manifest import read_manifest
from vislens.extract.datasets.records import DataSet, ImageRecord
from vislens.extract.datasets.synthetic import make_synthetic

__all__ = ["DataSet", "ImageRecord", "load_data", "read_manifest", "make_synthetic"]

SYNTHETIC_DEFAULT_N = 32


def _subsample(records: list[ImageRecord], limit: int | None, seed: int | None) -> list[ImageRecord]:
    if limit is None or limit >= len(records):
        return records
    if limit < 1:
        raise DataError(f"--limit must be at least 1, got {limit}")
    if seed is None:
        return records[:limit]
    keep = np.sort(np.random.default_rng(seed).choice(len(records), size=limit, replace=False))
    return [records[i] for i in keep]


def load_data(
    spec: str,
    *,
    limit: int | None = None,
    seed: int | None = None,
    cache_dir: Path | None = None,
) -> DataSet:
    """Load the records a ``--data`` spec names.

    ``limit`` keeps the first N records, or a random sample of N (in data order) when
    ``seed`` is given.
    """
    if spec == "synthetic" or spec.startswith("synthetic:"):
        from vislens.extract.toy_model import default_cache_dir

        n = SYNTHETIC_DEFAULT_N
        if ":" in spec:
            try:
                n = int(spec.split(":", 1)[1])
            except ValueError:
                raise DataError(f"bad spec {spec!r}: use synthetic:N with N an integer") from None
        root = Path(cache_dir) if cache_dir else default_cache_dir()
        records = read_manifest(make_synthetic(root / f"synthetic-{n}", n))
        return DataSet("synthetic", tuple(_subsample(records, limit, seed)), seed=seed, source=spec)
    path = Path(spec)
    records = read_manifest(path)
    return DataSet(path.stem, tuple(_subsample(records, limit, seed)), seed=seed, source=str(path.resolve()))
