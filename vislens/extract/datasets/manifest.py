"""vislens's own manifest: JSON lines of ``{"id", "image", "captions"}``."""

from __future__ import annotations

from pathlib import Path

from vislens.errors import DataError
from vislens.extract.datasets.records import ImageRecord, json_objects


def read_manifest(path: str | Path) -> list[ImageRecord]:
    """Read a JSONL manifest; ``image`` paths are relative to the manifest's folder.

    Raises
    ------
    DataError
        If the file is missing, a line is not JSON, lacks ``id`` or ``image``, has captions
        that are not a list of non-empty strings, or repeats an id.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"manifest {path} does not exist; pass a JSONL file of "
            '{"id": ..., "image": ..., "captions": [...]} lines (see docs/store-format.md)'
        )
    records: list[ImageRecord] = []
    seen: set[str] = set()
    for where, item in json_objects(path.read_text(encoding="utf-8"), path):
        for key in ("id", "image"):
            if not isinstance(item.get(key), str) or not item[key]:
                raise DataError(f'{where}: missing "{key}" (a non-empty string); add it to the line')
        captions = item.get("captions", [])
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise DataError(f'{where}: "captions" must be a list of strings')
        if any(not c.strip() for c in captions):
            raise DataError(f'{where}: "captions" holds an empty caption; remove it or fill it in')
        if item["id"] in seen:
            raise DataError(f'{where}: id "{item["id"]}" appears twice; ids must be unique')
        seen.add(item["id"])
        image = item["image"]
        if "://" not in image:
            image = str((path.parent / image).resolve())
        records.append(ImageRecord(item["id"], image, tuple(captions)))
    if not records:
        raise DataError(f"manifest {path} holds no records")
    return records
