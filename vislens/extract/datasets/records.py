"""The one record type every data set loader yields, and the JSON-lines reader they share."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vislens.errors import DataError


@dataclass(frozen=True)
class ImageRecord:
    """One image with its reference captions.

    Parameters
    ----------
    id : unique id of the image within the data set.
    image : absolute path or URL of the image file.
    captions : reference captions (may be empty for extraction; scoring needs them).
    """

    id: str
    image: str
    captions: tuple[str, ...] = ()


@dataclass(frozen=True)
class DataSet:
    """Records plus what the store records about where they came from."""

    name: str
    records: tuple[ImageRecord, ...]
    split: str = ""
    seed: int | None = None
    source: str = ""

    def provenance(self) -> dict[str, object]:
        """What a store records about the data set (root attribute ``dataset``)."""
        return {
            "name": self.name,
            "split": self.split,
            "seed": self.seed,
            "source": self.source,
            "n_images": len(self.records),
        }


def json_objects(text: str, source: object) -> Iterator[tuple[str, dict[str, Any]]]:
    """The JSON object on each non-blank line of ``text``, with ``"source:line"`` for errors.

    Raises
    ------
    DataError
        If a line is not JSON or not a JSON object.
    """
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg}); each line must be one object") from None
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected a JSON object, found {type(item).__name__}")
        yield where, item
