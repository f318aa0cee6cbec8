"""What every analysis needs: the groups of a store, finished samples, labels."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from vislens.errors import StoreFormatError
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


def finished(ds: xr.Dataset, done: xr.DataArray | None = None) -> xr.Dataset:
    """Only the samples whose extraction finished (``done == 1``)."""
    flags = np.asarray((done if done is not None else ds["done"]).values)
    keep = np.flatnonzero(flags == DONE)
    if keep.size == 0:
        raise StoreFormatError("the store has no finished samples yet; run (or resume) `vislens extract`")
    return ds.isel(sample=keep)


def label(store: StoreLike) -> str:
    """How a store is named in tables: its URL/path as opened."""
    if isinstance(store, str):
        return store
    return str(store.attrs.get("vislens_url", ""))


def model_name(store: StoreLike) -> str:
    """The model a store was extracted from."""
    model = store.attrs.get("model", {}) if not isinstance(store, str) else {}
    return str(model.get("name_or_path", ""))


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

    Columns: store, model, prompt_kind, [prompt_id, prompt_text,] layer, then ``values`` (the
    prompt columns when the analysis averaged by prompt).
    """
    frames = []
    for store in stores:
        tree = as_tree(store)
        frame = analysis(tree).to_dataframe().reset_index()
        frame.insert(0, "model", model_name(tree))
        frame.insert(0, "store", label(store) or label(tree))
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    by_prompt = "prompt_id" in table.columns
    keys = ["prompt_kind", "prompt_id", "prompt_text"] if by_prompt else ["prompt_kind"]
    columns = ["store", "model", *keys, "layer", *values]
    order = ["store", "prompt_kind", "prompt_id", "layer"] if by_prompt else ["store", "prompt_kind", "layer"]
    return table[columns].sort_values(order, kind="stable").reset_index(drop=True)
