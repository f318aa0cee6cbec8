"""MS-COCO captions in Karpathy's split file (``dataset_coco.json``).

Each image entry names its file as ``<images root>/<filepath>/<filename>`` and holds its
reference captions as ``sentences[*].raw``. Image files are not opened here: extraction skips
(or, with ``--strict``, fails on) the ones that are missing or unreadable.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from vislens.errors import DataError
from vislens.extract.datasets.records import ImageRecord

COCO_SPLITS = ("train", "val", "test", "restval")
ALL_SPLITS = "all"


def _image_path(images: str, filepath: str, filename: str) -> str:
    if "://" in images:
        return "/".join(part.strip("/") for part in (images, filepath, filename) if part)
    return str((Path(images) / filepath / filename).resolve())


def _require(entry: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str, where: str) -> Any:
    value = entry.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        found = "nothing" if key not in entry else f"{type(value).__name__} {value!r}"[:80]
        raise DataError(
            f'{where}: missing "{key}" ({what}), found {found}; is this the Karpathy split file dataset_coco.json?'
        )
    return value


def _load_json(path: Path) -> list[Any]:
    if not path.is_file():
        raise DataError(
            f"COCO split file {path} does not exist; pass coco:PATH with PATH the Karpathy split "
            "file dataset_coco.json (from the caption_datasets archive)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"COCO split file {path} is not valid JSON ({exc}); re-extract dataset_coco.json") from None
    if not isinstance(data, dict):
        raise DataError(
            f'COCO split file {path}: expected one JSON object {{"dataset": "coco", "images": [...]}}, '
            f"found a {type(data).__name__}"
        )
    images = data.get("images")
    if not isinstance(images, list):
        found = "nothing" if "images" not in data else f"a {type(images).__name__}"
        raise DataError(
            f'COCO split file {path}: missing key "images" (a list of image entries), found {found}; '
            "is this the Karpathy split file dataset_coco.json?"
        )
    return images


def read_coco(path: str | Path, images: str | None, split: str = "test") -> list[ImageRecord]:
    """Read the images of one Karpathy split, in file order.

    Parameters
    ----------
    path : the Karpathy split file ``dataset_coco.json``.
    images : root folder (or URL) holding COCO's ``train2014/`` and ``val2014/`` folders.
    split : ``train``, ``val``, ``test``, ``restval``, or ``all``.

    Returns
    -------
    Records with id ``str(cocoid)`` (``imgid`` when there is no ``cocoid``), the image path,
    and the stripped ``raw`` text of every sentence as captions.

    Raises
    ------
    DataError
        If ``images`` is missing or not a folder, the split is unknown or empty, or the file is
        missing, not JSON, or lacks a key of the format.
    """
    path = Path(path)
    if split not in (*COCO_SPLITS, ALL_SPLITS):
        raise DataError(f"unknown COCO split {split!r}; use --split with one of {', '.join(COCO_SPLITS)} or all")
    if not images:
        raise DataError(
            f"coco:{path} needs the image root: add --images DIR, the folder holding COCO's train2014/ and "
            "val2014/ folders (images are read from DIR/<filepath>/<filename>)"
        )
    if "://" not in images and not Path(images).is_dir():
        raise DataError(
            f"--images {images} is not a folder; pass the folder holding COCO's train2014/ and val2014/ folders"
        )
    entries = _load_json(path)
    records: list[ImageRecord] = []
    splits: Counter[str] = Counter()
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"{path}: images[{index}]"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected an image entry (a JSON object), found a {type(entry).__name__}")
        entry_split = _require(entry, "split", str, f"one of {', '.join(COCO_SPLITS)}", where)
        splits[entry_split] += 1
        if split != ALL_SPLITS and entry_split != split:
            continue
        filepath = _require(entry, "filepath", str, "the image's folder, e.g. val2014", where)
        filename = _require(entry, "filename", str, "the image's file name", where)
        if "cocoid" in entry:
            image_id = str(_require(entry, "cocoid", int, "the COCO image id, an integer", where))
        else:
            image_id = str(_require(entry, "imgid", int, "cocoid or imgid, an integer", where))
        sentences = _require(entry, "sentences", list, "a list of {raw, tokens, ...} sentences", where)
        captions = []
        for k, sentence in enumerate(sentences):
            if not isinstance(sentence, dict):
                raise DataError(f'{where}: sentences[{k}] must be an object with a "raw" caption')
            raw = _require(sentence, "raw", str, "the caption text", f"{where}.sentences[{k}]").strip()
            if raw:
                captions.append(raw)
        if image_id in seen:
            raise DataError(f"{where}: image id {image_id} appears twice; ids must be unique")
        seen.add(image_id)
        records.append(ImageRecord(image_id, _image_path(images, filepath, filename), tuple(captions)))
    if not records:
        found = ", ".join(f"{name}: {n}" for name, n in sorted(splits.items())) or "no images at all"
        raise DataError(
            f"COCO split {split!r} of {path} holds no images (found {found}); "
            f"choose another --split ({', '.join(COCO_SPLITS)} or all)"
        )
    return records
