"""Analysis 2: inter- and intra-modal cosine similarity of hidden states, per layer (docs/methods.md).

For layer l with image-token states v_1..v_m and text-token states w_1..w_n::

    inter_modal(l) = 1/(m n) sum_i sum_j cos(v_i, w_j)
    intra_image(l) = mean over pairs i != j of cos(v_i, v_j)   (likewise intra_text)

computed per sample with the one-pass identity of `vislens.kernels.mean_cosine`, then
averaged over samples. The text tokens are chosen by ``text_tokens`` from the store's
``token_role`` array: ``instruction`` (the default, the study's "corresponding instruction
hidden states": not BOS, not the chat template, not padding), ``template`` (template words,
separators and special tokens other than BOS) or ``all`` (every non-image, non-padding token).
A sample without such tokens (the empty prompt has no instruction) gives NaN, left out of the
means and counted in ``n_text_samples``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import xarray as xr

from vislens.analyze.common import (
    StoreLike,
    finished,
    group,
    group_key,
    long_table,
    mean_by,
    require_hidden,
    sample_coords,
)
from vislens.errors import StoreFormatError
from vislens.kernels.sample_stats import COSINE_STATS
from vislens.store import IMAGE, TEXT
from vislens.store.results import load_result
from vislens.store.schema import ROLE_INSTRUCTION, ROLE_TEMPLATE

STATS = COSINE_STATS
TEXT_TOKENS = ("instruction", "all", "template")


def text_mask(roles_or_modality: np.ndarray, text_tokens: str) -> np.ndarray:
    """Boolean mask of the text tokens of a selection, from ``token_role`` (or ``modality`` for ``all``)."""
    if text_tokens == "instruction":
        return roles_or_modality == ROLE_INSTRUCTION
    if text_tokens == "template":
        return roles_or_modality == ROLE_TEMPLATE
    return roles_or_modality == TEXT


def _block_stats(
    hidden: np.ndarray, tokens: np.ndarray, modality: np.ndarray, text_tokens: str, backend: str
) -> np.ndarray:
    """(k, layer, token, d_model), (k, token) text selector and modality -> (k, layer, 3) float32."""
    from vislens.kernels.sample_stats import cosine_stats

    h = torch.from_numpy(np.ascontiguousarray(hidden))
    image = torch.from_numpy(np.ascontiguousarray(modality == IMAGE))[:, None, :]
    text = torch.from_numpy(np.ascontiguousarray(text_mask(tokens, text_tokens)))[:, None, :]
    return cosine_stats(h, image, text, backend).numpy().astype(np.float32)


def _text_selector(acts: xr.Dataset, text_tokens: str) -> xr.DataArray:
    if text_tokens not in TEXT_TOKENS:
        raise ValueError(f"text_tokens must be one of {TEXT_TOKENS}, got {text_tokens!r}")
    if text_tokens == "all":
        return acts["modality"]
    if "token_role" not in acts:
        raise StoreFormatError(
            f"this store has no token_role array (it was written by an older vislens, format version "
            f"{acts.attrs.get('vislens_format_version', '?')}), so its instruction tokens are unknown: use "
            "--text-tokens all (text_tokens='all': every non-image token, BOS and template included) or re-extract"
        )
    return acts["token_role"]


def _from_results(tree: xr.DataTree, acts: xr.Dataset, text_tokens: str) -> xr.Dataset | None:
    """The statistics computed during extraction (``--compute cosine``), if the store has them."""
    if not isinstance(tree, xr.DataTree):
        return None
    stats = load_result(tree, "cosine")
    if stats is None or not stats.attrs.get("written_at_extraction"):
        return None
    sets = [str(v) for v in stats["text_tokens"].values]
    names = [str(v) for v in stats["stat"].values]
    if text_tokens not in sets:
        return None
    chosen = stats.sel(sample=acts["sample"].values).isel(text_tokens=sets.index(text_tokens), drop=True)
    return xr.Dataset({name: chosen.isel(stat=names.index(name), drop=True) for name in STATS})


def cosine_per_sample(
    store: StoreLike,
    *,
    text_tokens: str = "instruction",
    backend: str = "auto",
    samples_per_task: int = 4,
    source: str = "auto",
) -> xr.Dataset:
    """Per finished sample and layer: ``inter_modal``, ``intra_image``, ``intra_text``.

    Lazy (Dask): one task per ``samples_per_task`` samples; call ``.compute()``, or let
    `cosine` do it, under any Dask scheduler (threads, or a distributed cluster).
    ``source``: ``auto`` reads the statistics computed during extraction (``--compute cosine``)
    when the store has them, else computes them from the hidden states; ``hidden`` always
    computes; ``results`` always reads.
    """
    tree = store if isinstance(store, xr.DataTree) else None
    acts = finished(group(store, "activations"))
    if source not in ("auto", "hidden", "results"):
        raise ValueError(f"source must be auto, hidden or results, got {source!r}")
    stored = _from_results(tree, acts, text_tokens) if source != "hidden" and tree is not None else None
    if stored is not None:
        out = stored
        out.attrs["source"] = "computed during extraction (results/cosine)"
        return _labelled(out, acts, text_tokens)
    if source == "results":
        raise StoreFormatError("this store has no cosine statistics computed during extraction (--compute cosine)")
    if tree is not None:
        require_hidden(tree, acts, "the cosine analysis", "--compute cosine (statistics computed during extraction)")
    selector = _text_selector(acts, text_tokens)
    chunks = {"sample": samples_per_task, "token": -1}
    hidden = acts["hidden"].chunk(chunks | {"layer": -1, "d_model": -1})
    stats = xr.apply_ufunc(
        _block_stats,
        hidden,
        selector.chunk(chunks),
        acts["modality"].chunk(chunks),
        input_core_dims=[["layer", "token", "d_model"], ["token"], ["token"]],
        output_core_dims=[["layer", "stat"]],
        dask="parallelized",
        output_dtypes=[np.float32],
        dask_gufunc_kwargs={"output_sizes": {"stat": len(STATS)}},
        kwargs={"backend": backend, "text_tokens": text_tokens},
    )
    out = xr.Dataset({name: stats.isel(stat=i, drop=True) for i, name in enumerate(STATS)})
    out.attrs["source"] = "computed from the stored hidden states"
    return _labelled(out, acts, text_tokens)


def _labelled(out: xr.Dataset, acts: xr.Dataset, text_tokens: str) -> xr.Dataset:
    out["inter_modal"].attrs = {"long_name": f"mean cosine similarity of image-token and {text_tokens}-token states"}
    out["intra_image"].attrs = {"long_name": "mean cosine similarity of pairs of distinct image-token states"}
    out["intra_text"].attrs = {"long_name": f"mean cosine similarity of pairs of distinct {text_tokens}-token states"}
    out.attrs["text_tokens"] = text_tokens
    return out.assign_coords(sample_coords(acts))


def cosine(
    store: StoreLike,
    *,
    text_tokens: str = "instruction",
    by: str = "kind",
    backend: str = "auto",
    samples_per_task: int = 4,
) -> xr.Dataset:
    """Mean over samples of each statistic, per prompt kind or prompt (``by``) and layer.

    Parameters
    ----------
    store : an opened store (`vislens.open_store`), its ``activations`` Dataset, or a URL.
    text_tokens : ``instruction`` (default), ``all`` or ``template``: which tokens count as text.
    by : ``kind`` or ``prompt``.
    backend : kernel backend for `vislens.kernels.mean_cosine`.

    ``n_text_samples`` counts the samples that have such text tokens (the others are NaN and
    left out: the empty prompt has no instruction).
    """
    per_sample = cosine_per_sample(
        store, text_tokens=text_tokens, backend=backend, samples_per_task=samples_per_task
    ).compute()
    means = mean_by(per_sample, by)
    has_text = per_sample["inter_modal"].isel(layer=0, drop=True).notnull().astype(np.int64)
    means["n_text_samples"] = has_text.reset_coords(drop=True).groupby(group_key(per_sample, by)).sum("sample")
    means.attrs["text_tokens"] = text_tokens
    return means


def cosine_table(
    stores: list[StoreLike], *, text_tokens: str = "instruction", by: str = "kind", backend: str = "auto"
) -> pd.DataFrame:
    """Long table over stores: store, model, prompt columns, layer, inter_modal, intra_*, n_samples,
    n_text_samples, text_tokens."""
    table = long_table(
        stores,
        lambda tree: cosine(tree, text_tokens=text_tokens, by=by, backend=backend),
        [*STATS, "n_samples", "n_text_samples"],
    )
    table["text_tokens"] = text_tokens
    return table
