"""What every analysis needs: the groups of a store, finished samples, labels."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from vislens.errors import StoreFormatError, StoreIncompleteError
from vislens.store import DONE, open_group, open_store

StoreLike = str | xr.DataTree | xr.Dataset


def as_tree(store: StoreLike, storage_options: dict[str, Any] | None = None) -> xr.DataTree:
    """An opened store (a URL or path is opened; a tree is returned as is)."""
    if isinstance(store, xr.DataTree):
        return store
    if isinstance(store, xr.Dataset):
        raise TypeError("this analysis needs the whole store (open it with vislens.open_store), not one group")
    return open_store(store, storage_options)


def group(store: StoreLike, name: str) -> xr.Dataset:
    """One group as a Dataset; a Dataset passed in is taken to be that group."""
    if isinstance(store, xr.Dataset):
        return store
    return open_group(as_tree(store), name)


log = logging.getLogger("vislens.analyze")
_WARNED: set[tuple[str, int, int]] = set()


def finished(ds: xr.Dataset, done: xr.DataArray | None = None) -> xr.Dataset:
    """Only the samples whose extraction finished (``done == 1``); a partial store is warned about once."""
    flags = np.asarray((done if done is not None else ds["done"]).values)
    keep = np.flatnonzero(flags == DONE)
    if keep.size == 0:
        raise StoreFormatError("the store has no finished samples yet; run (or resume) `vislens extract`")
    if keep.size < flags.size:
        key = (str(ds.attrs.get("vislens_url", "")), int(keep.size), int(flags.size))
        if key not in _WARNED:
            _WARNED.add(key)
            log.warning(
                "%s: %d of %d samples done; results cover those only (resume the extraction to finish it, or "
                "pass --require-complete to refuse partial stores)",
                key[0] or "store",
                keep.size,
                flags.size,
            )
    return ds.isel(sample=keep)


def require_hidden(tree: xr.DataTree, acts: xr.Dataset, analysis: str, alternative: str) -> None:
    """Refuse, with the reason and the fix, an analysis that needs hidden states a store does not hold.

    Raises
    ------
    StoreFormatError
    """
    if "hidden" in acts.data_vars:
        return
    keep = tree.attrs.get("keep", [])
    computed = tree.attrs.get("computed", [])
    held = f"; its results hold {', '.join(computed)} computed during extraction" if computed else ""
    raise StoreFormatError(
        f"this store holds no hidden states (it was extracted with --keep {','.join(keep) or 'none'}){held}: "
        f"{analysis} needs them or {alternative}; re-extract with --keep hidden or with that option"
    )


def completeness(tree: xr.DataTree) -> tuple[int, int]:
    """(samples done, samples in the store) of the activations group; ablation-only stores count
    their (image, prompt) pairs."""
    for name in ("activations", "ablation"):
        if name in tree.children and "done" in tree[name].data_vars:
            flags = np.asarray(tree[name]["done"].values)
            return int((flags == DONE).sum()), int(flags.size)
    return 0, 0


def require_complete(trees: list[xr.DataTree]) -> None:
    """Refuse partial stores (``--require-complete``).

    Raises
    ------
    StoreIncompleteError
        Naming each partial store with its done/total.
    """
    partial = [(label(t), *completeness(t)) for t in trees]
    partial = [p for p in partial if p[1] < p[2]]
    if partial:
        listed = "; ".join(f"{url}: {done} of {total} samples done" for url, done, total in partial)
        raise StoreIncompleteError(
            f"{listed}. Resume the extraction (rerun the same `vislens extract` command) to finish it, "
            "or leave out --require-complete to analyse the finished samples only"
        )


def coverage(tree: xr.DataTree) -> str:
    """``"62 of 600 samples"`` (or ``"all 600 samples"``) for captions and tables."""
    done, total = completeness(tree)
    return f"all {total} samples" if done == total else f"{done} of {total} samples"


def label(store: StoreLike) -> str:
    """How a store is named in tables: its URL/path as opened."""
    if isinstance(store, str):
        return store
    return str(store.attrs.get("vislens_url", ""))


def model_name(store: StoreLike) -> str:
    """The model a store was extracted from, as a reader knows it: the hub id, or the folder's name
    of a local checkpoint (not its full path)."""
    model = store.attrs.get("model", {}) if not isinstance(store, str) else {}
    name = str(model.get("name_or_path", ""))
    local = name.startswith(("/", ".", "~")) or os.sep in name and name.count("/") != 1 or os.path.isdir(name)
    return Path(name.rstrip("/")).name if local and name else name


def short_labels(urls: list[str]) -> list[str]:
    """The shortest distinct path endings of store URLs: ``a/store.zarr`` and ``b/store.zarr``
    for two folders named ``store.zarr``; the folder name alone when that is distinct."""
    parts = [[p for p in u.rstrip("/").split("/") if p] or [u] for u in urls]
    depth = [1] * len(urls)
    while True:
        names = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        clashes = {n for n in names if names.count(n) > 1}
        grow = [i for i, n in enumerate(names) if n in clashes and depth[i] < len(parts[i])]
        if not grow:
            return names
        for i in grow:
            depth[i] += 1


def store_labels(trees: list[StoreLike]) -> list[str]:
    """Legend labels of stores shown side by side: model name and a short distinct path."""
    shorts = short_labels([label(t) for t in trees])
    return [f"{model_name(t)} · {short}" if model_name(t) else short for t, short in zip(trees, shorts)]


def compute(obj: Any, *, progress: bool = False) -> Any:
    """Compute a lazy xarray object on the active Dask scheduler, with a progress bar if asked.

    With a `distributed` client active (e.g. a LocalCluster), the work runs on its workers.
    """
    if not progress:
        return obj.compute()
    try:
        from distributed import get_client

        get_client()
    except (ImportError, ValueError):
        from dask.diagnostics import ProgressBar

        with ProgressBar(minimum=1.0):
            return obj.compute()
    from distributed import progress as distributed_progress

    persisted = obj.persist()
    distributed_progress(persisted)
    return persisted.compute()


def as_text(array: xr.DataArray) -> xr.DataArray:
    """A (computed) string array as fixed-width unicode, which grouping and pandas handle everywhere."""
    values = np.asarray(array.values)
    return array.copy(data=np.array(values.tolist(), dtype=str).reshape(values.shape))


BY = ("kind", "prompt")
"""How per-sample results are averaged: per prompt kind, or per single prompt (kind and id)."""

PROMPT_COORDS = ("prompt_kind", "prompt_id", "prompt_text", "image_id")


def sample_coords(acts: xr.Dataset) -> dict[str, xr.DataArray]:
    """Per-sample labels every analysis keeps: prompt kind, prompt id and text, image id."""
    return {name: as_text(acts[name]) for name in PROMPT_COORDS if name in acts}


def group_key(per_sample: xr.Dataset, by: str) -> xr.DataArray:
    """The grouping key of each sample: ``prompt_kind``, or ``prompt`` = ``kind:id``."""
    if by not in BY:
        raise ValueError(f"by must be one of {BY}, got {by!r}")
    kinds = np.asarray(per_sample["prompt_kind"].values).astype(str)
    if by == "kind":
        return xr.DataArray(kinds, dims="sample", name="prompt_kind")
    ids = np.asarray(per_sample["prompt_id"].values).astype(str)
    return xr.DataArray(np.char.add(np.char.add(kinds, ":"), ids), dims="sample", name="prompt")


def mean_by(per_sample: xr.Dataset, by: str = "kind") -> xr.Dataset:
    """Mean over samples of every (sample, ...) variable, per prompt kind or per prompt.

    ``by="kind"`` gives dims (prompt_kind, ...); ``by="prompt"`` gives dims (prompt, ...) with
    coordinates ``prompt_kind``, ``prompt_id`` and ``prompt_text`` along ``prompt`` (the key is
    ``kind:id``). NaN values (a sample without the tokens a statistic needs) are left out of
    the mean; ``n_samples`` counts every sample of the group.
    """
    key = group_key(per_sample, by)
    data = per_sample.drop_vars([c for c in PROMPT_COORDS if c in per_sample.coords])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Mean of empty slice", category=RuntimeWarning)
        means = data.groupby(key).mean("sample")
    ones = xr.DataArray(np.ones(key.size, dtype=np.int64), dims="sample")
    means["n_samples"] = ones.groupby(key).sum("sample")
    if by == "prompt":
        first = {k: i for i, k in reversed(list(enumerate(key.values)))}
        rows = [first[k] for k in means["prompt"].values]
        for name in ("prompt_kind", "prompt_id", "prompt_text"):
            means = means.assign_coords({name: ("prompt", np.asarray(per_sample[name].values).astype(str)[rows])})
    means.attrs.update(per_sample.attrs)
    means.attrs["averaged_by"] = by
    return means


def long_table(
    stores: list[StoreLike], analysis: Callable[[xr.DataTree], xr.Dataset], values: list[str]
) -> pd.DataFrame:
    """One row per (store, prompt kind or prompt, layer): ``analysis(tree)`` of every store, stacked.

    Columns: store (URL), model (name), series (model and a short distinct path, for legends),
    prompt_kind, [prompt_id, prompt_text,] layer, ``values``, then samples_done and samples_total
    of the store (a partial store says so in every table).
    """
    frames = []
    trees = [as_tree(store) for store in stores]
    for tree, series in zip(trees, store_labels(trees)):
        frame = analysis(tree).to_dataframe().reset_index()
        done, total = completeness(tree)
        frame.insert(0, "samples_total", total)
        frame.insert(0, "samples_done", done)
        frame.insert(0, "series", series)
        frame.insert(0, "model", model_name(tree))
        frame.insert(0, "store", label(tree))
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    by_prompt = "prompt_id" in table.columns
    keys = ["prompt_kind", "prompt_id", "prompt_text"] if by_prompt else ["prompt_kind"]
    columns = ["store", "model", "series", *keys, "layer", *values, "samples_done", "samples_total"]
    order = ["store", "prompt_kind", "prompt_id", "layer"] if by_prompt else ["store", "prompt_kind", "layer"]
    return table[columns].sort_values(order, kind="stable").reset_index(drop=True)
