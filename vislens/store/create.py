"""Create a store: every group and array pre-allocated, written through xarray.

Big per-sample arrays are declared lazily (dask templates, ``compute=False``) so only
metadata is written; what is known before extraction (the plan, the lens, the captions)
is written at once. The root status goes from ``creating`` to ``ready`` last, and the
metadata is consolidated so that stores can be read over plain HTTP.
"""

from __future__ import annotations

import datetime as _dt
import warnings
from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from vislens.store import schema
from vislens.store.location import StoreLocation

STATUS_CREATING, STATUS_READY = "creating", "ready"


@dataclass(frozen=True)
class LensData:
    """What logit lens needs without the model (rows of ``unembedding`` are vocabulary ids)."""

    unembedding: np.ndarray
    norm_kind: str
    norm_eps: float
    norm_weight: np.ndarray
    norm_bias: np.ndarray | None
    vocab_text: list[str]
    vocab_special: np.ndarray


@dataclass(frozen=True)
class CaptionData:
    """Reference captions of every image id of the store."""

    image_ids: list[str]
    captions: list[tuple[str, ...]]
    paths: list[str] | None = None
    """Where each image was read from (absolute path or URL), for figures drawn over the image."""


@dataclass(frozen=True)
class StoreSpec:
    """Everything needed to create a store; ``plan`` holds the per-sample string/int arrays."""

    layout: schema.Layout
    attrs: dict[str, Any]
    fingerprint: str
    plan: dict[str, np.ndarray]
    captions: CaptionData
    lens: LensData | None = None
    layer_attrs: dict[str, Any] = field(default_factory=dict)
    clevel: int = 1


BLOSC_BLOCKSIZE = 256 * 1024
"""Blosc block of 256 KiB: each byte plane of a block fills a whole zstd window, which is what
makes byte-shuffled fp16 compress (ratio ~1.17 against ~1.08 with Blosc's default 32-128 KiB
blocks at any level); measured in bench/store.py."""


def hidden_codecs(clevel: int = 1, typesize: int = 2) -> list[Any]:
    """Lossless byte-shuffled zstd (Blosc, 256 KiB blocks) then a crc32c checksum."""
    blosc = BloscCodec(cname="zstd", clevel=clevel, shuffle="shuffle", typesize=typesize, blocksize=BLOSC_BLOCKSIZE)
    return [blosc, Crc32cCodec()]


def small_codecs() -> list[Any]:
    """zstd then a crc32c checksum."""
    return [ZstdCodec(level=3), Crc32cCodec()]


def _strings(values: list[str] | np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.dtypes.StringDType())


def _activations(spec: StoreSpec) -> tuple[xr.Dataset, dict[str, Any]]:
    layout = spec.layout
    sizes = layout.sizes()
    data, encoding = {}, {}
    for var in schema.variables(layout):
        if var.group != "activations":
            continue
        if var.per_sample:
            shape = tuple(sizes[d] for d in var.dims)
            chunk, shard = schema.chunking(var, layout)
            array = da.full(shape, var.fill_value, dtype=var.dtype, chunks=shard)
            codecs = hidden_codecs(spec.clevel) if var.name == "hidden" else small_codecs()
            encoding[var.name] = {"chunks": chunk, "shards": shard, "compressors": codecs, "fill_value": var.fill_value}
        else:
            array = spec.plan[var.name]
            n = layout.n_samples
            block = min(layout.block, n)
            encoding[var.name] = {"chunks": (block,), "shards": (block,), "compressors": small_codecs()}
        data[var.name] = xr.Variable(var.dims, array, attrs=var.attrs)
    coords = {
        "sample": ("sample", np.arange(layout.n_samples, dtype=np.int64)),
        "layer": xr.Variable("layer", np.arange(layout.n_layers, dtype=np.int32), attrs=spec.layer_attrs),
    }
    encoding |= {name: {"compressors": small_codecs()} for name in coords}
    return xr.Dataset(data, coords=coords), encoding


def _attention(spec: StoreSpec) -> tuple[xr.Dataset, dict[str, Any]]:
    layout = spec.layout
    sizes = layout.sizes() | {"layer": layout.n_layers - 1}
    data, encoding = {}, {}
    for var in schema.variables(layout):
        if var.group != "attention":
            continue
        shape = tuple(sizes[d] for d in var.dims)
        chunk, shard = schema.chunking(var, layout)
        chunk = tuple(min(c, s) for c, s in zip(chunk, shape))
        shard = (1,) + shape[1:] if var.name != "query_pos" else shard
        data[var.name] = xr.Variable(
            var.dims, da.full(shape, var.fill_value, dtype=var.dtype, chunks=shard), attrs=var.attrs
        )
        typesize = np.dtype(var.dtype).itemsize
        codecs = hidden_codecs(spec.clevel, typesize) if var.name != "query_pos" else small_codecs()
        encoding[var.name] = {"chunks": chunk, "shards": shard, "compressors": codecs, "fill_value": var.fill_value}
    coords = {
        "sample": ("sample", np.arange(layout.n_samples, dtype=np.int64)),
        "layer": xr.Variable(
            "layer",
            np.arange(1, layout.n_layers, dtype=np.int32),
            attrs={
                "long_name": "decoder layer l (1 .. L): its input is activations layer l - 1, its output activations layer l"
            },
        ),
    }
    encoding |= {name: {"compressors": small_codecs()} for name in coords}
    return xr.Dataset(data, coords=coords), encoding


def _lens(lens: LensData) -> tuple[xr.Dataset, dict[str, Any]]:
    vocab, hidden = lens.unembedding.shape
    rows = max(1, min(vocab, (8 << 20) // max(1, hidden * lens.unembedding.dtype.itemsize)))
    data = {
        "unembedding": (("vocab", "d_model"), lens.unembedding, {"long_name": "W_U: logits = norm(h) @ W_U.T"}),
        "norm_weight": (("d_model",), lens.norm_weight.astype(np.float32)),
        "vocab_text": (
            ("vocab",),
            _strings(lens.vocab_text),
            {"long_name": "token text after other text (leading space kept)"},
        ),
        "vocab_special": (("vocab",), lens.vocab_special.astype(bool)),
    }
    if lens.norm_bias is not None:
        data["norm_bias"] = (("d_model",), lens.norm_bias.astype(np.float32))
    ds = xr.Dataset(data, attrs={"norm_kind": lens.norm_kind, "norm_eps": float(lens.norm_eps)})
    encoding = {name: {"compressors": small_codecs()} for name in data}
    encoding["unembedding"] = {
        "chunks": (rows, hidden),
        "compressors": hidden_codecs(3, lens.unembedding.dtype.itemsize),
    }
    return ds, encoding


def captions_dataset(captions: CaptionData) -> tuple[xr.Dataset, dict[str, Any]]:
    """The ``captions`` group (``image_id``, ``text``, ``n_captions``) and its encoding."""
    n = len(captions.image_ids)
    width = max([len(c) for c in captions.captions] + [1])
    table = [list(c) + [""] * (width - len(c)) for c in captions.captions]
    ds = xr.Dataset(
        {
            "image_id": (("image",), _strings(captions.image_ids)),
            "text": (
                ("image", "caption"),
                _strings(table).reshape(n, width),
                {"long_name": "reference captions; '' pads rows with fewer captions"},
            ),
            "n_captions": (("image",), np.array([len(c) for c in captions.captions], dtype=np.int32)),
        }
    )
    if captions.paths is not None:
        ds["image_path"] = (
            ("image",),
            _strings(captions.paths),
            {"long_name": "where the image was read from at extraction (absolute path or URL)"},
        )
    return ds, {name: {"compressors": small_codecs()} for name in ds.data_vars}


def create_store(location: StoreLocation, spec: StoreSpec, *, ready: bool = True) -> None:
    """Write every group of a new store at ``location`` (which must be empty).

    ``ready=False`` leaves its status ``creating``: `mark_ready` then makes it readable (a
    writer narrows its claim on the store in between, `vislens.store.writer.prepare_store`).
    """
    store = location.zarr_store(read_only=False)
    attrs = {
        "vislens_format_version": schema.FORMAT_VERSION,
        "vislens_status": STATUS_CREATING,
        "vislens_fingerprint": spec.fingerprint,
        "vislens_block": spec.layout.block,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **spec.attrs,
    }
    root = zarr.open_group(store, mode="w", zarr_format=3, attributes=attrs)
    parts = [("activations", _activations(spec)), ("captions", captions_dataset(spec.captions))]
    if spec.layout.attention:
        parts.append(("attention", _attention(spec)))
    if spec.lens is not None:
        parts.append(("lens", _lens(spec.lens)))
    for group, (ds, encoding) in parts:
        # compute=False: numpy variables are written, dask templates only declared
        ds.to_zarr(store, group=group, mode="a", compute=False, encoding=encoding, zarr_format=3, consolidated=False)
    root.create_group("results", attributes={"long_name": "cached analysis results"})
    if ready:
        mark_ready(location)
    else:
        consolidate(store)


def mark_ready(location: StoreLocation) -> None:
    """Set a created store's status to ``ready`` (last: readers refuse it before) and consolidate."""
    store = location.zarr_store(read_only=False)
    root = zarr.open_group(store, mode="r+", zarr_format=3, use_consolidated=False)
    root.attrs.update({"vislens_status": STATUS_READY})
    consolidate(store)


def consolidate(store: Any) -> None:
    """Consolidate metadata into the root zarr.json (lets stores be read over plain HTTP)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(store)
