"""``vislens info`` and ``vislens verify``: what a store holds, and whether every chunk is sound."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from vislens.errors import StoreFormatError
from vislens.store import schema
from vislens.store.location import StoreLocation, as_location
from vislens.store.reader import check_root, check_safety


@dataclass(frozen=True)
class VariableInfo:
    """Storage of one array: logical bytes of its written shards and bytes on disk."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None
    files: int
    stored_bytes: int
    logical_bytes: int

    @property
    def ratio(self) -> float:
        """Compression ratio (logical / stored) of what is written."""
        return self.logical_bytes / self.stored_bytes if self.stored_bytes else float("nan")


def _arrays(root: zarr.Group) -> list[tuple[str, Any]]:
    out = []
    for name, group in sorted(root.groups()):
        out += [(f"{name}/{a}", array) for a, array in sorted(group.arrays())]
    return out


def info(store: str | StoreLocation, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Model, samples done/total, groups and per-array storage of a store."""
    location = as_location(store, storage_options)
    root_doc = check_root(location)
    check_safety(location, root_doc)
    root = zarr.open_group(location.zarr_store(read_only=True), mode="r", use_consolidated=False)
    sizes = location.sizes()
    variables = []
    for path, array in _arrays(root):
        files = {k: v for k, v in sizes.items() if k.startswith(f"{path}/c/") or k == f"{path}/c"}
        outer = array.shards or array.chunks
        per_file = int(np.prod(outer)) * array.dtype.itemsize if array.dtype.kind != "T" else 0
        logical = per_file * len(files) if per_file else sum(files.values())
        variables.append(
            VariableInfo(
                path,
                array.shape,
                "string" if array.dtype.kind == "T" else str(array.dtype),
                array.chunks,
                array.shards,
                len(files),
                sum(files.values()),
                logical,
            )
        )
    unit = "samples"
    if "activations" in root:
        done = np.asarray(root["activations/done"][:])
    else:  # an ablation-only store: its (image, prompt) pairs
        ablation = [name for name, group in root.groups() if "done" in group and name != "activations"]
        done = (
            np.concatenate([np.asarray(root[f"{name}/done"][:]).ravel() for name in ablation])
            if ablation
            else np.zeros(0)
        )
        unit = "ablation pairs"
    attrs = root_doc.get("attributes", {})
    return {
        "unit": unit,
        "url": location.url,
        "format_version": attrs.get("vislens_format_version"),
        "model": attrs.get("model", {}),
        "dataset": attrs.get("dataset", {}),
        "samples": {
            "total": int(done.size),
            "done": int((done == schema.DONE).sum()),
            "skipped": int((done == schema.SKIPPED).sum()),
            "pending": int((done == schema.PENDING).sum()),
        },
        "groups": sorted(name for name, _ in root.groups()),
        "variables": variables,
        "bytes_on_disk": sum(sizes.values()),
    }


def format_info(report: dict[str, Any]) -> str:
    """``info`` as text for the terminal."""
    model = report["model"]
    s = report["samples"]
    lines = [
        f"store    {report['url']} (vislens format {report['format_version']})",
        f"model    {model.get('name_or_path', '?')} ({model.get('architecture', '?')}, {model.get('n_layers', '?')} layers, "
        f"hidden {model.get('hidden_size', '?')}, dtype {model.get('dtype', '?')})",
        f"data     {report['dataset'].get('name', '?')} ({report['dataset'].get('n_images', '?')} images)",
        f"{report.get('unit', 'samples'):<8} {s['done']} done / {s['total']} total ({s['skipped']} skipped, {s['pending']} pending)",
        f"groups   {', '.join(report['groups'])}",
        f"on disk  {report['bytes_on_disk'] / 2**20:.1f} MiB",
        "",
        f"{'array':<28} {'shape':<26} {'dtype':<9} {'files':>6} {'stored MiB':>11} {'ratio':>6}",
    ]
    for v in report["variables"]:
        ratio = f"{v.ratio:.2f}" if np.isfinite(v.ratio) else "-"
        lines.append(
            f"{v.path:<28} {str(v.shape):<26} {v.dtype:<9} {v.files:>6} {v.stored_bytes / 2**20:>11.2f} {ratio:>6}"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a store: which array, which chunk (file key), what."""

    array: str
    chunk: str
    message: str

    def __str__(self) -> str:
        where = f"{self.array} chunk {self.chunk}" if self.chunk else self.array
        return f"{where}: {self.message}"


def _shard_regions(array: Any) -> list[tuple[tuple[int, ...], tuple[slice, ...]]]:
    outer = array.shards or array.chunks
    grid = [range(-(-n // c)) for n, c in zip(array.shape, outer, strict=True)]
    return [
        (index, tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, outer, array.shape, strict=True)))
        for index in itertools.product(*grid)
    ]


def _dims(array: Any) -> tuple[str, ...]:
    return tuple(array.metadata.dimension_names or ())


def _check_schema(root: zarr.Group) -> list[Problem]:
    problems = []
    acts = root.get("activations")
    if acts is None:
        return [Problem("activations", "", "group missing")] if "ablation" not in root else []
    for var in schema.variables(_layout(root), int(root.attrs.get("vislens_format_version", schema.FORMAT_VERSION))):
        path = f"{var.group}/{var.name}"
        if var.group not in root or var.name not in root[var.group]:
            problems.append(Problem(path, "", "array missing"))
            continue
        array = root[var.group][var.name]
        dims = _dims(array)
        if dims != var.dims:
            problems.append(Problem(path, "", f"dimensions {dims}, expected {var.dims}"))
        want = "string" if var.dtype == schema.STRING else var.dtype
        got = "string" if array.dtype.kind == "T" else str(array.dtype)
        if got != want:
            problems.append(Problem(path, "", f"dtype {got}, expected {want}"))
    return problems


def _layout(root: zarr.Group) -> schema.Layout:
    hidden = root["activations/hidden"]
    s, layers, tokens, width = hidden.shape
    attn = root.get("attention")
    heads = query = 0
    if attn is not None and "attn" in attn:
        _, _, heads, query, _ = attn["attn"].shape
    lens = root.get("lens")
    vocab = lens["unembedding"].shape[0] if lens is not None and "unembedding" in lens else 0
    caps = root.get("captions")
    n_images, n_captions = caps["text"].shape if caps is not None and "text" in caps else (0, 0)
    return schema.Layout(s, layers, tokens, width, heads, query, vocab, n_images, n_captions)


def verify(
    store: str | StoreLocation, storage_options: dict[str, Any] | None = None, *, progress: bool = False
) -> list[Problem]:
    """Read every chunk of every array (checksums), check the schema and that done samples are stored.

    Returns the problems found (empty when the store is sound). Metadata that cannot be read
    at all raises `StoreFormatError`.
    """
    from tqdm.auto import tqdm

    location = as_location(store, storage_options)
    root_doc = check_root(location)
    check_safety(location, root_doc)
    root = zarr.open_group(location.zarr_store(read_only=True), mode="r", use_consolidated=False)
    problems = _check_schema(root)
    done = np.asarray(root["activations/done"][:]) if "activations" in root else np.zeros(0)
    arrays = _arrays(root)
    keys = set(location.sizes())
    for path, array in tqdm(arrays, desc="verify", unit="array", disable=not progress):
        encode = array.metadata.chunk_key_encoding.encode_chunk_key
        for index, region in _shard_regions(array):
            key = f"{path}/{encode(index)}"
            try:
                array[region]
            except Exception as exc:  # noqa: BLE001 - any decode failure is a finding
                problems.append(Problem(path, key, f"cannot be read ({type(exc).__name__}: {exc})"))
                continue
            per_sample = path.split("/")[0] in ("activations", "attention") and _dims(array)[:1] == ("sample",)
            if per_sample and key not in keys and (done[region[0]] == schema.DONE).any():
                first = region[0].start + int(np.argmax(done[region[0]] == schema.DONE))
                problems.append(Problem(path, key, f"sample {first} is marked done but this chunk is missing"))
    return problems


__all__ = ["info", "format_info", "verify", "Problem", "VariableInfo", "StoreFormatError"]
