"""The one record type every data set loader yields."""

from __future__ import annotations

from dataclasses import dataclass


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
