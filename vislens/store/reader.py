"""Open a store for reading: version and safety checks, then an `xarray.DataTree`.

The safety check reads every array's metadata as plain JSON *before* zarr or xarray
touch a chunk, and refuses any data type or codec outside the allowlist of
`vislens.store.schema` (so no pickle codec and no object dtype can ever be decoded).
"""

from __future__ import annotations

from typing import Any

import xarray as xr

from vislens.errors import StoreFormatError, StoreSafetyError
from vislens.store import schema
from vislens.store.create import STATUS_READY
from vislens.store.location import StoreLocation, as_location
from vislens.store.upgrade import upgrade_v1


def check_root(location: StoreLocation) -> dict[str, Any]:
    """Root metadata of a readable vislens store of this format version.

    Raises
    ------
    StoreFormatError
        No store there, not a vislens store, another format version, or not finished.
    """
    doc = location.read_json("zarr.json")
    if doc is None:
        hint = " (a zarr v2 store?)" if location.read_json(".zgroup") is not None else ""
        raise StoreFormatError(
            f"no zarr v3 store at {location.url}{hint}; check the path or URL "
            "(vislens stores are written by `vislens extract`)"
        )
    attrs = doc.get("attributes", {})
    version = attrs.get("vislens_format_version")
    if version is None:
        raise StoreFormatError(
            f"{location.url} is a zarr store but not a vislens store (no root attribute "
            "vislens_format_version); open it with xarray directly"
        )
    if version not in schema.READABLE_VERSIONS:
        raise StoreFormatError(
            f"{location.url} has vislens store format version {version}, but this vislens reads "
            f"versions {', '.join(map(str, schema.READABLE_VERSIONS))}; install a vislens release that reads version "
            f"{version} (see docs/store-format.md, 'Versions')"
        )
    if attrs.get("vislens_status") != STATUS_READY:
        raise StoreFormatError(
            f"{location.url} was never finished being created (status {attrs.get('vislens_status')!r}); "
            "rerun the `vislens extract` command that made it"
        )
    return doc


def _codec_names(codecs: list[Any]) -> list[str]:
    names = []
    for codec in codecs or []:
        name = codec.get("name") if isinstance(codec, dict) else codec
        names.append(str(name))
        config = codec.get("configuration", {}) if isinstance(codec, dict) else {}
        names += _codec_names(config.get("codecs", [])) + _codec_names(config.get("index_codecs", []))
    return names


def check_metadata(path: str, doc: dict[str, Any]) -> None:
    """Refuse one node's metadata if it has an unsafe data type or codec."""
    if doc.get("zarr_format") != 3:
        raise StoreSafetyError(f"{path}: zarr_format {doc.get('zarr_format')}, expected 3")
    if doc.get("node_type") != "array":
        return
    dtype = doc.get("data_type")
    if not isinstance(dtype, str) or dtype not in schema.SAFE_DATA_TYPES:
        raise StoreSafetyError(
            f"{path}: data type {dtype!r} is not one vislens writes (object and pickled types are "
            "refused); this store was not made by vislens or was tampered with"
        )
    for name in _codec_names(doc.get("codecs", [])):
        if name not in schema.SAFE_CODECS:
            raise StoreSafetyError(
                f"{path}: codec {name!r} is refused (only {sorted(schema.SAFE_CODECS)} are read, so "
                "that opening a store never runs code); this store was not made by vislens"
            )


def metadata_documents(location: StoreLocation, root: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every node's metadata: the consolidated copies and each node's own zarr.json."""
    docs: dict[str, dict[str, Any]] = {}
    consolidated = (root.get("consolidated_metadata") or {}).get("metadata") or {}
    for path, doc in consolidated.items():
        docs[f"consolidated:{path}"] = doc
    paths = set(consolidated)
    try:
        found = location.fs.find(location.path, detail=False)
        base = location.path.rstrip("/") + "/"
        paths |= {p[len(base) : -len("/zarr.json")] for p in found if p.endswith("/zarr.json") and p.startswith(base)}
    except (OSError, NotImplementedError, ValueError):
        pass  # stores that cannot be listed (plain HTTP) are checked through their consolidated paths
    for path in sorted(paths):
        doc = location.read_json(path, "zarr.json")
        if doc is not None:
            docs[path] = doc
    return docs


def check_safety(location: StoreLocation, root: dict[str, Any]) -> None:
    """Refuse the store if any node's metadata is unsafe."""
    for path, doc in metadata_documents(location, root).items():
        check_metadata(path, doc)


def open_store(store: str | StoreLocation, storage_options: dict[str, Any] | None = None) -> xr.DataTree:
    """Open a vislens store (local path or fsspec URL) as a lazy `xarray.DataTree`.

    Groups: ``activations``, ``attention`` (if extracted), ``lens``, ``captions``,
    ``results``; root attributes hold the provenance. Arrays are Dask-backed. Stores of an
    older readable format version are presented in the current layout (`vislens.store.upgrade`).

    Raises
    ------
    StoreFormatError
        Not a vislens store, another format version, or unfinished.
    StoreSafetyError
        A data type or codec outside vislens's allowlist (e.g. pickle).
    """
    location = as_location(store, storage_options)
    root = check_root(location)
    check_safety(location, root)
    consolidated = bool(root.get("consolidated_metadata"))
    tree = xr.open_datatree(
        location.zarr_store(read_only=True),
        engine="zarr",
        consolidated=consolidated,
        zarr_format=3,
        chunks={},
    )
    if root.get("attributes", {}).get("vislens_format_version") == 1:
        tree = upgrade_v1(tree)
    tree.attrs["vislens_url"] = location.url
    _OPTIONS[location.url] = dict(location.storage_options)
    return tree


_OPTIONS: dict[str, dict[str, Any]] = {}
"""Storage options of the stores opened in this process, by URL (kept out of attributes)."""


def location_of(tree: xr.DataTree) -> StoreLocation:
    """Where an opened store lives, with the storage options it was opened with."""
    url = tree.attrs["vislens_url"]
    return StoreLocation(url, _OPTIONS.get(url, {}))


def open_group(
    store: str | StoreLocation | xr.DataTree, group: str, storage_options: dict[str, Any] | None = None
) -> xr.Dataset:
    """One group of a store as a Dataset (accepts an already opened tree)."""
    tree = store if isinstance(store, xr.DataTree) else open_store(store, storage_options)
    if group not in tree.children:
        raise StoreFormatError(
            f"store {tree.attrs.get('vislens_url', '')} has no group {group!r} "
            f"(groups: {sorted(tree.children)}); re-extract with the option that writes it"
        )
    ds = tree[group].to_dataset()
    ds.attrs = {**tree.attrs, **ds.attrs}
    return ds
