"""Winoground: 400 items of two images and two captions that use the same words.

Two layouts of a local copy are read:

- the original files: ``examples.jsonl`` with ``images/<image_k>.png`` beside it;
- the Hugging Face ``datasets`` parquet export (columns ``id``, ``image_0``, ``image_1`` as image
  structs ``{"bytes", "path"}``, ``caption_0``, ``caption_1``, ...); its images are written once
  to a cache folder. Needs pyarrow.

Each item yields two records, (image_0, caption_0) and (image_1, caption_1), ids
``ex_<id>_img_0`` and ``ex_<id>_img_1``. Image files are not opened here.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from vislens.errors import DataError
from vislens.extract.datasets.manifest import read_manifest
from vislens.extract.datasets.records import ImageRecord, json_objects

FIELDS = ("id", "image_0", "image_1", "caption_0", "caption_1")
PAIR = tuple[ImageRecord, ImageRecord]


def read_winoground(path: str | Path, images: str | None = None, cache_dir: Path | None = None) -> list[PAIR]:
    """Read a local copy of Winoground as (image_0 record, image_1 record) pairs, in file order.

    Parameters
    ----------
    path : a folder holding ``examples.jsonl`` (or ``*.parquet`` files), or one such file.
    images : folder of ``<image_k>.png``; default ``images/`` beside ``examples.jsonl``.
    cache_dir : where the parquet export's images are written (default vislens's cache).

    Raises
    ------
    DataError
        If neither layout is found, a line or row lacks a field, an id repeats, or pyarrow is
        missing for a parquet export.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "examples.jsonl").is_file():
            return _read_jsonl(path / "examples.jsonl", images)
        parquets = sorted(path.rglob("*.parquet"))
        if parquets:
            return _read_parquet(parquets, cache_dir)
        raise DataError(
            f"winoground:{path}: the folder holds neither examples.jsonl nor *.parquet files; point it at the "
            "folder of the local copy (examples.jsonl plus images/ from images.zip)"
        )
    if path.suffix == ".parquet" and path.is_file():
        return _read_parquet([path], cache_dir)
    if path.is_file():
        return _read_jsonl(path, images)
    raise DataError(
        f"winoground:{path} does not exist; pass the folder holding examples.jsonl and images/ "
        "(or the examples.jsonl file, or the parquet export)"
    )


def _field(item: dict[str, Any], key: str, where: str) -> Any:
    value = item.get(key)
    ok = isinstance(value, int) and not isinstance(value, bool) if key == "id" else isinstance(value, str) and value
    if not ok:
        what = "an integer" if key == "id" else "a non-empty string"
        found = "nothing" if key not in item else repr(value)[:60]
        raise DataError(f'{where}: missing "{key}" ({what}), found {found}; is this Winoground\'s examples.jsonl?')
    return value


def _check_unique(pairs: list[PAIR], source: Path) -> list[PAIR]:
    seen: set[str] = set()
    for pair in pairs:
        for record in pair:
            if record.id in seen:
                raise DataError(f"{source}: image id {record.id} appears twice; ids must be unique")
            seen.add(record.id)
    if not pairs:
        raise DataError(f"{source} holds no Winoground items")
    return pairs


def _read_jsonl(path: Path, images: str | None) -> list[PAIR]:
    root = Path(images) if images else path.parent / "images"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a text file; expected Winoground's examples.jsonl") from None
    pairs: list[PAIR] = []
    for where, item in json_objects(text, path):
        for key in FIELDS:
            _field(item, key, where)
        pairs.append(
            tuple(
                ImageRecord(
                    item[f"image_{k}"], str((root / f"{item[f'image_{k}']}.png").resolve()), (item[f"caption_{k}"],)
                )
                for k in (0, 1)
            )
        )
    return _check_unique(pairs, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _suffix(data: bytes, name: str | None) -> str:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return ".png"
    if data.startswith(b"\xff\xd8"):
        return ".jpg"
    return Path(name).suffix if name and Path(name).suffix else ".png"


def _image_bytes(value: Any, parquet: Path, where: str) -> tuple[bytes, str | None]:
    if isinstance(value, bytes | bytearray):
        return bytes(value), None
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"]), value.get("path")
        if value.get("path"):
            source = Path(value["path"])
            source = source if source.is_absolute() else parquet.parent / source
            if source.is_file():
                return source.read_bytes(), source.name
    raise DataError(
        f"{where}: expected an image struct {{'bytes': ..., 'path': ...}} holding the image, found "
        f"{repr(value)[:60]}; export the data set again with its images embedded"
    )


def _read_parquet(files: list[Path], cache_dir: Path | None) -> list[PAIR]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DataError(
            f"reading the Winoground parquet export {files[0]} needs pyarrow ({exc}); "
            "pip install pyarrow, or use the examples.jsonl + images/ copy"
        ) from None
    from vislens.cache import default_cache_dir

    root = (Path(cache_dir) if cache_dir else default_cache_dir()) / "winoground-images"
    pairs: list[PAIR] = []
    for file in files:
        folder = root / _sha256(file)
        manifest = folder / "manifest.jsonl"
        if not manifest.is_file():
            _export(pq, file, folder, manifest)
        records = read_manifest(manifest)
        pairs.extend(zip(records[0::2], records[1::2], strict=True))
    return _check_unique(pairs, files[0] if len(files) == 1 else files[0].parent)


def _export(pq: Any, file: Path, folder: Path, manifest: Path) -> None:
    """Write the images of one parquet file and a vislens manifest of them (written last)."""
    try:
        names = pq.read_schema(file).names
    except Exception as exc:  # pyarrow raises its own error types for a bad file
        raise DataError(f"{file} is not a readable parquet file ({exc}); download the export again") from None
    missing = [key for key in FIELDS if key not in names]
    if missing:
        raise DataError(
            f"{file}: missing column(s) {', '.join(missing)}; expected the Winoground export with columns "
            f"{', '.join(FIELDS)} (found {', '.join(names)})"
        )
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for batch in pq.ParquetFile(file).iter_batches(batch_size=32, columns=list(FIELDS)):
        for item in batch.to_pylist():
            where = f"{file}: row with id {item.get('id')!r}"
            for key in ("id", "caption_0", "caption_1"):
                _field(item, key, where)
            for k in (0, 1):
                data, name = _image_bytes(item[f"image_{k}"], file, f"{where}, image_{k}")
                image_id = f"ex_{item['id']}_img_{k}"
                target = folder / f"{image_id}{_suffix(data, name)}"
                if not target.exists():
                    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
                    partial.write_bytes(data)
                    partial.replace(target)
                line = {"id": image_id, "image": target.name, "captions": [item[f"caption_{k}"]]}
                lines.append(json.dumps(line))
    if not lines:
        raise DataError(f"{file} holds no rows; expected the 400 Winoground items")
    partial = manifest.with_name(f".manifest.{os.getpid()}.part")
    partial.write_text("\n".join(lines) + "\n", encoding="utf-8")
    partial.replace(manifest)
