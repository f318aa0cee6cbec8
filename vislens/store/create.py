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
    stat_attrs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Attributes of each statistic's results group (e.g. the lens's final-norm reading)."""


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


def _group(spec: StoreSpec, group: str, layer_attrs: dict[str, Any]) -> tuple[xr.Dataset, dict[str, Any]]:
    """A group of per-sample arrays (and, for ``activations``, the plan written at once)."""
    layout = spec.layout
    sizes = layout.sizes(group)
    data, encoding = {}, {}
    for var in schema.variables(layout):
        if var.group != group:
            continue
        if var.per_sample:
            shape = tuple(sizes[d] for d in var.dims)
            chunk, shard = schema.chunking(var, layout)
            chunk = tuple(min(c, n) for c, n in zip(chunk, shape))
            array = da.full(shape, var.fill_value, dtype=var.dtype, chunks=shard)
            typesize = np.dtype(var.dtype).itemsize
            big = var.name in schema.SAMPLE_FILES or group == "captures"
            codecs = hidden_codecs(spec.clevel, typesize) if big else small_codecs()
            encoding[var.name] = {"chunks": chunk, "shards": shard, "compressors": codecs, "fill_value": var.fill_value}
        else:
            array = spec.plan[var.name]
            block = min(layout.block, layout.n_samples)
            encoding[var.name] = {"chunks": (block,), "shards": (block,), "compressors": small_codecs()}
        data[var.name] = xr.Variable(var.dims, array, attrs=var.attrs)
    used = {d for v in data.values() for d in v.dims}
    coords: dict[str, Any] = {"sample": ("sample", np.arange(layout.n_samples, dtype=np.int64))}
    if "layer" in used or group == "activations":
        coords["layer"] = xr.Variable(
            "layer", np.asarray(layout.layer_labels(group), dtype=np.int32), attrs=layer_attrs
        )
    if "vision_layer" in used:
        coords["vision_layer"] = xr.Variable(
            "vision_layer",
            np.arange(1, sizes["vision_layer"] + 1, dtype=np.int32),
            attrs={"long_name": "vision-tower encoder layer (1 .. L_v)"},
        )
    if group == schema.STAT_GROUPS["cosine"]:
        coords["text_tokens"] = ("text_tokens", _strings(list(schema.TEXT_TOKENS)))
        coords["stat"] = ("stat", _strings(list(schema.COSINE_STATS)))
    encoding |= {name: {"compressors": small_codecs()} for name in coords}
    return xr.Dataset(data, coords=coords), encoding


ATTENTION_LAYER_ATTRS = {
    "long_name": "decoder layer l (1 .. L): its input is activations layer l - 1, its output activations layer l"
}


def _stat_groups(spec: StoreSpec) -> list[tuple[str, tuple[xr.Dataset, dict[str, Any]]]]:
    """The ``results`` groups of statistics computed at extraction, pre-allocated like activations."""
    out = []
    for stat in spec.layout.stats:
        group = schema.STAT_GROUPS[stat]
        attrs = ATTENTION_LAYER_ATTRS if stat == "norm-attention" else spec.layer_attrs
        ds, encoding = _group(spec, group, attrs)
        for var in ds.data_vars.values():  # on each array, where `load_result` reads them
            var.attrs.update(
                written_at_extraction=1,
                source_fingerprint=spec.fingerprint,
                **({"k": spec.layout.lens_k} if stat == "lens" else {}),
                **spec.stat_attrs.get(stat, {}),
            )
        out.append((group, (ds, encoding)))
    return out


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


def create_store(location: StoreLocation, spec: StoreSpec) -> None:
    """Write every group of a new store at ``location`` (which must be empty)."""
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
    parts = [
        ("activations", _group(spec, "activations", spec.layer_attrs)),
        ("captions", captions_dataset(spec.captions)),
    ]
    if spec.layout.attention:
        parts.append(("attention", _group(spec, "attention", ATTENTION_LAYER_ATTRS)))
    if spec.layout.captures:
        parts.append(("captures", _group(spec, "captures", ATTENTION_LAYER_ATTRS)))
    parts += _stat_groups(spec)
    if spec.lens is not None:
        parts.append(("lens", _lens(spec.lens)))
    for group, (ds, encoding) in parts:
        # compute=False: numpy variables are written, dask templates only declared
        ds.to_zarr(store, group=group, mode="a", compute=False, encoding=encoding, zarr_format=3, consolidated=False)
    results = root.require_group("results")
    results.attrs.update({"long_name": "analysis results: cached by analyses, or computed at extraction"})
    root.attrs.update({"vislens_status": STATUS_READY})
    consolidate(store)


def consolidate(store: Any) -> None:
    """Consolidate metadata into the root zarr.json (lets stores be read over plain HTTP)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(store)
