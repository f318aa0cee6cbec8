"""The errors vislens raises: one small hierarchy, each also a built-in type.

Every message says what was expected, what was found, and how to fix it.
"""

from __future__ import annotations


class VislensError(Exception):
    """Base class of every error vislens raises on purpose."""


class StoreFormatError(VislensError, ValueError):
    """A store is not a vislens store of a version this release reads, or is malformed."""


class StoreIncompleteError(VislensError, ValueError):
    """A store's extraction has not finished and the caller asked for complete stores only."""


class StoreSafetyError(StoreFormatError):
    """A store holds a data type or codec that could run code or that vislens never writes."""


class StoreExistsError(VislensError, FileExistsError):
    """The output path already holds something that is not the store asked for."""


class StoreMismatchError(VislensError, ValueError):
    """A rerun into an existing store asked for a different extraction."""


class ChecksumError(StoreFormatError):
    """A chunk failed its checksum or could not be decoded."""


class DiskFullError(VislensError, OSError):
    """The disk (or bucket quota) filled during a write; finished samples are safe."""


class DataError(VislensError, ValueError):
    """A data set, manifest, caption or image is missing or malformed."""


class ImageError(DataError):
    """An image file is missing or cannot be decoded."""


class ModelError(VislensError, ValueError):
    """A model cannot be used as asked (unknown family, no eager attention, bad placeholders)."""


class UnsupportedModelError(ModelError):
    """No adapter knows this model architecture."""


class BackendUnavailableError(VislensError, RuntimeError):
    """An explicitly requested kernel backend cannot run here."""


class ConfigError(VislensError, ValueError):
    """Options that contradict each other or are out of range."""


class ClusterError(VislensError, RuntimeError):
    """A Dask cluster cannot be reached, has no workers, or its workers cannot read a store."""


class StoreLockedError(VislensError, RuntimeError):
    """Another live writer holds samples of the same store (two runs started on it by mistake)."""


class KernelCheckError(VislensError, RuntimeError):
    """A kernel's result failed its own correctness check on every path it could take."""
