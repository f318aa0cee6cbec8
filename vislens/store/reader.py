"""Open a store for reading: version and safety checks, then an `xarray.DataTree`.

The safety check reads every array's metadata as plain JSON *before* zarr or xarray
touch a chunk, and refuses any data type or codec outside the allowlist of
`vislens.store.schema` (so no pickle codec and no object dtype can ever be decoded).
"""

from __future__ import annotations

import uuid
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
        chunks=None,
        cache=False,
    )
    tree = by_shard(tree)
    if root.get("attributes", {}).get("vislens_format_version") == 1:
        tree = upgrade_v1(tree)
    tree.attrs["vislens_url"] = location.url
    _OPTIONS[location.url] = dict(location.storage_options)
    return tree


def by_shard(tree: xr.DataTree) -> xr.DataTree:
    """Every array of a lazily opened tree as a Dask array with one chunk per stored shard.

    A chunk of Dask is then one file (or object) of the store: one sample of ``hidden``,
    ``attn`` and ``value_gram`` (all its layers), a block of samples of the small per-sample
    arrays. A task that computes on one sample reads that sample's file and nothing else, so
    on a cluster each worker reads only the samples it computes on (`docs/scaling.md`), and a
    remote store serves one request per file. Selections (e.g. one layer) still read only the
    inner chunks they need: Dask fuses the selection into the read.
    """
    token = uuid.uuid4().hex[:12]  # a store reopened after a write must not reuse cached keys
    groups: dict[str, xr.Dataset] = {}
    for node in tree.subtree:
        ds = node.to_dataset(inherit=False)
        chunked = {}
        for name, var in ds.variables.items():
            if name in ds.indexes:
                continue
            sizes = var.encoding.get("shards") or var.encoding.get("chunks") or var.shape
            chunked[name] = var.chunk(
                dict(zip(var.dims, sizes)), name=f"vislens-{node.path.strip('/') or 'root'}-{name}-{token}"
            )
        groups[node.path] = ds.assign(chunked) if chunked else ds
    out = xr.DataTree.from_dict(groups)
    out.attrs = dict(tree.attrs)
    return out


_OPTIONS: dict[str, dict[str, Any]] = {}
"""Storage options of the stores opened in this process, by URL (kept out of attributes, so
that no secret is ever written into a store). Only this process sees them: work that runs
elsewhere (Dask workers) gets the `StoreLocation` from `location_of` as an argument."""


def location_of(tree: xr.DataTree) -> StoreLocation:
    """Where an opened store lives, with the storage options it was opened with.

    Call it where the tree was opened (the Dask client), and pass the location to tasks:
    workers do not share this process's options.
    """
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
