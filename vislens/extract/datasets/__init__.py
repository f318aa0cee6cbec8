"""Data sets: turn a ``--data`` spec into image records.

Specs:

- ``PATH`` : a vislens JSONL manifest (``{"id", "image", "captions"}`` lines).
- ``synthetic`` or ``synthetic:N`` : the first N held-out scenes of the toys' shapes world
  (`vislens.toys.shapes`; default 32), written once into vislens's cache.
- ``coco:PATH`` : MS-COCO captions, Karpathy split file ``dataset_coco.json``; needs ``images``
  (the folder holding ``train2014/`` and ``val2014/``) and uses ``split``.
- ``winoground:PATH`` : a local Winoground copy: a folder holding ``examples.jsonl`` and
  ``images/``, the ``examples.jsonl`` file itself, or the Hugging Face parquet export (a
  ``.parquet`` file or a folder of them; needs pyarrow).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vislens.errors import ConfigError, DataError
from vislens.extract.datasets.coco import COCO_SPLITS, read_coco
from vislens.extract.datasets.manifest import read_manifest
from vislens.extract.datasets.records import DataSet, ImageRecord
from vislens.extract.datasets.winoground import read_winoground

__all__ = [
    "COCO_SPLITS",
    "DataSet",
    "ImageRecord",
    "load_data",
    "read_coco",
    "read_manifest",
    "read_winoground",
]

SYNTHETIC_DEFAULT_N = 32


def _subsample(records: list, limit: int | None, seed: int | None) -> list:
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
    images: str | None = None,
    split: str = "test",
) -> DataSet:
    """Load the records a ``--data`` spec names (see the module docstring for the specs).

    ``limit`` keeps the first N records, or a random sample of N (in data order) when
    ``seed`` is given. For ``winoground:`` it counts items, each two records (both images of
    an item are kept together). ``images`` is the image root of ``coco:`` (and overrides the
    ``images/`` folder of ``winoground:``); ``split`` picks the COCO split (``train``, ``val``,
    ``test``, ``restval`` or ``all``) and is ignored by the other specs.

    Raises
    ------
    DataError
        If the data set is missing or malformed (the message names what and how to fix it).
    ConfigError
        If ``images`` is given for a spec that has no use for it.
    """
    if spec.startswith("coco:"):
        path = Path(spec.removeprefix("coco:"))
        records = read_coco(path, images, split)
        return DataSet(
            "coco", tuple(_subsample(records, limit, seed)), split=split, seed=seed, source=str(path.resolve())
        )
    if spec.startswith("winoground:"):
        path = Path(spec.removeprefix("winoground:"))
        pairs = _subsample(read_winoground(path, images, cache_dir), limit, seed)
        records = [record for pair in pairs for record in pair]
        return DataSet("winoground", tuple(records), split="test", seed=seed, source=str(path.resolve()))
    if images is not None:
        raise ConfigError(
            f"--images {images} applies only to coco: and winoground: specs, not to {spec!r}; "
            "leave it out (manifest image paths are relative to the manifest's folder)"
        )
    if spec == "synthetic" or spec.startswith("synthetic:"):
        from vislens.cache import default_cache_dir
        from vislens.toys.shapes import SHAPES_VERSION, make_shapes

        n = SYNTHETIC_DEFAULT_N
        if ":" in spec:
            try:
                n = int(spec.split(":", 1)[1])
            except ValueError:
                raise DataError(f"bad spec {spec!r}: use synthetic:N with N an integer") from None
        root = Path(cache_dir) if cache_dir else default_cache_dir()
        records = read_manifest(make_shapes(root / f"shapes-v{SHAPES_VERSION}-test-{n}", n, split="test"))
        return DataSet("synthetic", tuple(_subsample(records, limit, seed)), seed=seed, source=spec)
    path = Path(spec)
    prefix = spec.split(":", 1)[0]
    if ":" in spec and "://" not in spec and len(prefix) > 1 and prefix.isidentifier() and not path.exists():
        raise DataError(
            f"unknown data spec {spec!r}: expected a manifest path, synthetic[:N], coco:PATH or winoground:PATH"
        )
    records = read_manifest(path)
    return DataSet(path.stem, tuple(_subsample(records, limit, seed)), seed=seed, source=str(path.resolve()))
