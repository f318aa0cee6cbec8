"""The lens (final norm and unembedding) of a store, read once per process that decodes with it.

The unembedding is 250-330 MB at 7B-13B. Passed as an argument of every logit-lens task it would
be serialised into each task of a Dask graph and shipped to the workers again and again (issue 14,
item 4). Tasks get a `LensRef` instead, a few hundred bytes: where the store is, with its
storage options (they reach the workers this way, never through the store's attributes), and
which extraction it holds. The first task in a process reads the lens group from the store, and
later tasks in that process reuse it (`LensRef.arrays`); a cluster's workers each read it once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr
import zarr

from vislens.errors import StoreFormatError, StoreMismatchError
from vislens.store.location import StoreLocation
from vislens.store.reader import check_metadata, check_root, location_of

KEPT = 1
"""Lenses kept per process (the analyses decode one store after another; 13B's is 330 MB)."""

_CACHE: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
_LOCK = threading.Lock()
_READS = 0


def lens_arrays(lens: xr.Dataset) -> dict[str, Any]:
    """What decoding needs from a ``lens`` group: unembedding (vocab, d_model) as stored, norm
    weight and bias (float32; bias None without one), norm kind and eps."""
    return {
        "unembedding": np.asarray(lens["unembedding"].values),
        "norm_weight": np.asarray(lens["norm_weight"].values, dtype=np.float32),
        "norm_bias": np.asarray(lens["norm_bias"].values, dtype=np.float32) if "norm_bias" in lens else None,
        "norm_kind": str(lens.attrs["norm_kind"]),
        "norm_eps": float(lens.attrs["norm_eps"]),
    }


@dataclass(frozen=True)
class LensRef:
    """A store's lens group, to be read by the process that runs a task (and kept there).

    ``extraction`` is the store's fingerprint and creation time: a lens kept from another
    extraction at the same URL is never reused, and a store replaced while tasks run is refused.
    """

    location: StoreLocation
    extraction: str

    @classmethod
    def of(cls, tree: xr.DataTree) -> LensRef:
        """The lens of a store opened with `vislens.open_store` (in this process)."""
        return cls(location_of(tree), _extraction(tree.attrs))

    def arrays(self) -> dict[str, Any]:
        """The lens as `lens_arrays` gives it, read from the store on first use in this process."""
        key = (self.location.url, self.extraction)
        with _LOCK:  # one read per process, even with several threads per worker
            if key in _CACHE:
                _CACHE.move_to_end(key)
                return _CACHE[key]
            arrays = _read(self)
            _CACHE[key] = arrays
            while len(_CACHE) > KEPT:
                _CACHE.popitem(last=False)
            return arrays


def reads() -> int:
    """How many times this process has read a lens from a store (for tests and benchmarks)."""
    return _READS


def forget() -> None:
    """Drop the lenses kept by this process (frees their memory)."""
    with _LOCK:
        _CACHE.clear()


def _extraction(attrs: dict[str, Any]) -> str:
    return f"{attrs.get('vislens_fingerprint')}@{attrs.get('created')}"


def _read(ref: LensRef) -> dict[str, Any]:
    """Read the lens arrays with zarr, checking version, extraction and each array's metadata."""
    global _READS
    location = ref.location
    attrs = check_root(location).get("attributes", {})
    if _extraction(attrs) != ref.extraction:
        raise StoreMismatchError(
            f"{location.url} now holds another extraction than the one being analysed; "
            "rerun the analysis on the store as it is now"
        )
    group_doc = location.read_json("lens", "zarr.json")
    if group_doc is None:
        raise StoreFormatError(f"{location.url} has no lens group; re-extract to get one")
    root = zarr.open_group(location.zarr_store(read_only=True), mode="r", zarr_format=3, use_consolidated=False)
    values = {}
    for name in ("unembedding", "norm_weight", "norm_bias"):
        doc = location.read_json("lens", name, "zarr.json")
        if doc is None:
            continue
        check_metadata(f"lens/{name}", doc)  # the allowlist of open_store: no pickle, ever
        values[name] = (
            doc.get("dimension_names") or ("vocab", "d_model")[-len(doc["shape"]) :],
            root[f"lens/{name}"][...],
        )
    _READS += 1
    return lens_arrays(xr.Dataset(values, attrs=group_doc.get("attributes", {})))
