"""The ``results`` group: arrays that analyses derive and cache, keyed by their parameters."""

from __future__ import annotations

import logging
from typing import Any

import xarray as xr
import zarr

from vislens.store.create import consolidate, small_codecs
from vislens.store.location import StoreLocation, as_location
from vislens.store.writer import read_root

log = logging.getLogger("vislens.store")


def load_result(tree: xr.DataTree, name: str, **params: Any) -> xr.DataArray | None:
    """A cached result whose attributes match ``params`` and the store's fingerprint, else None.

    Each result lives in its own group ``results/<name>`` with its coordinates, so results over
    different samples (before and after a resumed extraction) never share a coordinate.
    """
    if "results" not in tree.children or name not in tree["results"].children:
        return None
    node = tree["results"][name].to_dataset(inherit=False)
    if name not in node.data_vars:
        return None
    array = node[name]
    if array.attrs.get("source_fingerprint") != tree.attrs.get("vislens_fingerprint"):
        return None
    if any(array.attrs.get(key) != value for key, value in params.items()):
        return None
    return array


def save_result(
    store: str | StoreLocation,
    name: str,
    array: xr.DataArray,
    storage_options: dict[str, Any] | None = None,
    **params: Any,
) -> bool:
    """Write ``array`` into the group ``results/<name>`` (replacing an older one); False if the store is read-only."""
    location = as_location(store, storage_options)
    attrs = read_root(location) or {}
    try:
        zstore = location.zarr_store(read_only=False)
        root = zarr.open_group(zstore, mode="r+", use_consolidated=False)
        results = root.require_group("results")
        if name in results:
            del results[name]  # the whole group: the result and its coordinates
        out = array.rename(name).to_dataset()
        out[name].attrs.update(params | {"source_fingerprint": attrs.get("vislens_fingerprint")})
        chunks = tuple(1 if i == 0 else n for i, n in enumerate(array.shape))
        encoding = {
            name: {"chunks": chunks, "shards": (min(64, array.shape[0]),) + chunks[1:], "compressors": small_codecs()}
        }
        for coord in out.coords:
            encoding[coord] = {"compressors": small_codecs()}
        out.to_zarr(zstore, group=f"results/{name}", mode="a", encoding=encoding, zarr_format=3, consolidated=False)
        consolidate(zstore)
    except (PermissionError, OSError, NotImplementedError) as exc:
        log.warning("could not cache results/%s in %s (%s); results are kept in memory only", name, location.url, exc)
        return False
    return True
