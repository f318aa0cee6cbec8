"""The vislens store: Zarr v3, readable as xarray, versioned, crash-safe. Knows nothing of models."""

from __future__ import annotations

from vislens.store.create import CaptionData, LensData, StoreSpec, create_store
from vislens.store.layers import read_layer
from vislens.store.location import StoreLocation, as_location
from vislens.store.reader import open_group, open_store
from vislens.store.schema import DONE, FORMAT_VERSION, IMAGE, PADDING, PENDING, SKIPPED, TEXT, Layout
from vislens.store.writer import PipelinedWriter, StoreWriter, prepare_store, shard_blocks

__all__ = [
    "CaptionData",
    "DONE",
    "FORMAT_VERSION",
    "IMAGE",
    "Layout",
    "PipelinedWriter",
    "LensData",
    "PADDING",
    "PENDING",
    "SKIPPED",
    "StoreLocation",
    "StoreSpec",
    "StoreWriter",
    "TEXT",
    "as_location",
    "create_store",
    "open_group",
    "open_store",
    "prepare_store",
    "read_layer",
    "shard_blocks",
]
