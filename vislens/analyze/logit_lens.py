"""Analysis 1: logit lens on image tokens, scored against the captions (docs/methods.md).

For the hidden state h of an image token at layer l: logits = norm(h) @ W_U.T with the
decoder's final norm, applied to every layer except the last when the store records that the
model's last hidden state already carries it (``final_norm_applied_to_last``, measured at
extraction). The top-k token ids of every image token at every layer are cached in the store's
``results`` group (``logit_lens_topk``), so re-scoring (another top-k up to the cached k, new
captions) is cheap. Each image token is decoded on its own; the words and the three scores
(precision, token_precision, recall) follow `vislens.analyze.words`.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr

from vislens.analyze.common import (
    StoreLike,
    as_tree,
    compute,
    finished,
    group,
    long_table,
    mean_by,
    require_hidden,
    sample_coords,
)
from vislens.analyze.words import STOPWORDS, Vocabulary, reference_words, scores
from vislens.errors import DataError
from vislens.kernels import lens_topk, prepare_unembedding
from vislens.kernels.lens_topk import LensNorm
from vislens.kernels.lens_topk.reference import apply_norm as kernel_apply_norm
from vislens.store import IMAGE
from vislens.store.reader import location_of
from vislens.store.results import load_result, save_result

CACHE_NAME = "logit_lens_topk"
log = logging.getLogger("vislens.analyze")


def apply_norm(x: torch.Tensor, kind: str, eps: float, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The decoder's final norm on float32 rows ``x`` (rows, d_model)."""
    if kind not in ("rms", "rms_offset", "layer"):
        raise DataError(f"unknown norm kind {kind!r} in lens/norm_kind; expected rms, rms_offset or layer")
    return kernel_apply_norm(x, LensNorm(kind, eps, weight, bias))


_PREPARED: dict[int, tuple[Any, Any]] = {}


def _prepared(unembedding: np.ndarray) -> Any:
    """The unembedding prepared for `vislens.kernels.lens_topk` once per array (and process)."""
    key = id(unembedding)
    hit = _PREPARED.get(key)
    if hit is not None and hit[0]() is unembedding:
        return hit[1]
    prepared = prepare_unembedding(unembedding)
    _PREPARED.clear()  # one store's unembedding at a time: bounded memory
    _PREPARED[key] = (weakref.ref(unembedding), prepared)
    return prepared


def _block_topk(
    hidden: np.ndarray, modality: np.ndarray, *, lens: dict[str, Any], k: int, normed: np.ndarray, backend: str
) -> np.ndarray:
    """(s, layer, token, d_model) fp16 -> (s, layer, token, k) int32 top-k ids at image tokens, -1 elsewhere.

    ``normed`` (layer,) bool marks the stored layers that already carry the final norm. The top-k
    is `vislens.kernels.lens_topk` (on the CPU its exact path: the ids of fp32 logits, ties to
    the smaller id), the same kernel extraction uses for ``--compute lens``.
    """
    s, n_layers, n_tokens, _ = hidden.shape
    out = np.full((s, n_layers, n_tokens, k), -1, dtype=np.int32)
    unembedding = _prepared(lens["unembedding"])
    norm = LensNorm(
        lens["norm_kind"],
        lens["norm_eps"],
        torch.from_numpy(lens["norm_weight"]),
        None if lens["norm_bias"] is None else torch.from_numpy(lens["norm_bias"]),
    )
    for i in range(s):
        positions = np.flatnonzero(modality[i] == IMAGE)
        if positions.size == 0:
            continue
        x = torch.from_numpy(np.ascontiguousarray(hidden[i][:, positions]))  # (layer, m, d_model) fp16
        ids = torch.empty((n_layers, positions.size, k), dtype=torch.int64)
        for done, layers in ((False, ~normed), (True, normed)):
            if layers.any():
                chosen = torch.from_numpy(np.flatnonzero(layers))
                ids[chosen] = lens_topk(x[chosen], unembedding, k, norm=None if done else norm, backend=backend)[1]
        out[i][:, positions] = ids.numpy()
    return out


def _lens_arrays(tree: xr.DataTree) -> dict[str, Any]:
    lens = group(tree, "lens")
    return {
        "unembedding": np.asarray(lens["unembedding"].values),
        "norm_weight": np.asarray(lens["norm_weight"].values, dtype=np.float32),
        "norm_bias": np.asarray(lens["norm_bias"].values, dtype=np.float32) if "norm_bias" in lens else None,
        "norm_kind": str(lens.attrs["norm_kind"]),
        "norm_eps": float(lens.attrs["norm_eps"]),
    }


def logit_lens_topk(store: StoreLike, k: int = 1, *, backend: str = "auto", samples_per_task: int = 1) -> xr.DataArray:
    """Lazy (Dask) top-k ids of every image token at every layer: (sample, layer, token, rank) int32.

    Only finished samples; non-image positions hold -1.
    """
    tree = as_tree(store)
    acts = finished(group(tree, "activations"))
    require_hidden(tree, acts, "the logit lens", "--compute lens (top-k computed during extraction)")
    last = int(tree.attrs.get("model", {}).get("n_layers", int(acts["layer"].values.max())))
    normed = (acts["layer"].values == last) & bool(_normed_last(tree))
    hidden = acts["hidden"].chunk({"sample": samples_per_task, "layer": -1, "token": -1, "d_model": -1})
    modality = acts["modality"].chunk({"sample": samples_per_task, "token": -1})
    return xr.apply_ufunc(
        _block_topk,
        hidden,
        modality,
        input_core_dims=[["layer", "token", "d_model"], ["token"]],
        output_core_dims=[["layer", "token", "rank"]],
        dask="parallelized",
        output_dtypes=[np.int32],
        dask_gufunc_kwargs={"output_sizes": {"rank": k}},
        kwargs={"lens": _lens_arrays(tree), "k": k, "normed": normed, "backend": backend},
    ).rename("top_ids")


def _normed_last(tree: xr.DataTree) -> int:
    return int(group(tree, "activations")["layer"].attrs.get("final_norm_applied_to_last", 1))


def cached_topk(
    store: StoreLike, k: int = 1, *, cache: bool = True, progress: bool = False, **kwargs: Any
) -> xr.DataArray:
    """Top-k ids of the finished samples: from ``results/logit_lens_topk`` when it covers the request,
    else computed from the hidden states (and cached).

    The results are used when written for this store's fingerprint and final-norm reading with
    rank >= k, and either computed during extraction (``--compute lens``; every finished sample is
    there) or cached by an earlier analysis of exactly the samples done now (a resumed extraction
    makes an older cache stale). A result computed during extraction is never replaced.
    """
    tree = as_tree(store)
    normed_last = _normed_last(tree)
    cached = load_result(tree, CACHE_NAME, final_norm_applied_to_last=normed_last) if cache else None
    done = finished(group(tree, "activations"))["sample"].values
    at_extraction = cached is not None and bool(cached.attrs.get("written_at_extraction"))
    if cached is not None and cached.sizes["rank"] >= k:
        if at_extraction:
            return cached.sel(sample=done).isel(rank=slice(0, k)).compute()
        if np.array_equal(cached["sample"].values, done):
            return cached.isel(rank=slice(0, k)).compute()
    if at_extraction:
        log.info(
            "results hold the top-%d computed during extraction; top-%d is computed from the hidden states",
            cached.sizes["rank"],
            k,
        )
    top = compute(logit_lens_topk(tree, k, **kwargs), progress=progress)
    if cache and not at_extraction:
        save_result(location_of(tree), CACHE_NAME, top, k=k, final_norm_applied_to_last=normed_last)
    return top


def _block_scores(
    top: np.ndarray,
    modality: np.ndarray,
    image_index: np.ndarray,
    *,
    vocabulary: Vocabulary,
    references: list[set[str]],
) -> np.ndarray:
    """(s, layer, token, k) ids -> (s, layer, 3) precision, token_precision, recall."""
    s, n_layers = top.shape[:2]
    out = np.zeros((s, n_layers, 3), dtype=np.float64)
    for i in range(s):
        positions = np.flatnonzero(modality[i] == IMAGE)
        out[i] = scores(top[i][:, positions], vocabulary, references[int(image_index[i])])
    return out


def _references(tree: xr.DataTree, used: np.ndarray) -> list[set[str]]:
    caps = group(tree, "captions")
    texts, counts, ids = caps["text"].values, caps["n_captions"].values, caps["image_id"].values
    refs = [reference_words(texts[i, : counts[i]]) for i in range(len(counts))]
    for i in np.unique(used):
        if not refs[i]:
            raise DataError(
                f"image {ids[i]} has no reference caption words; logit-lens scoring needs captions "
                "(add them to the data set and re-extract, or drop the image)"
            )
    return refs


SCORES = ("precision", "token_precision", "recall")


def logit_lens_per_sample(
    store: StoreLike, *, top_k: int = 1, cache: bool = True, progress: bool = False, **kwargs: Any
) -> xr.Dataset:
    """``precision``, ``token_precision`` and ``recall`` per finished sample and layer (dims sample, layer)."""
    tree = as_tree(store)
    acts = finished(group(tree, "activations"))
    top = cached_topk(tree, top_k, cache=cache, progress=progress, **kwargs)
    lens = group(tree, "lens")
    image_index = acts["image_index"].values
    vocabulary = Vocabulary.build([str(t) for t in lens["vocab_text"].values], np.asarray(lens["vocab_special"].values))
    values = xr.apply_ufunc(
        _block_scores,
        top.chunk({"sample": 16}),
        acts["modality"].chunk({"sample": 16, "token": -1}),
        acts["image_index"].chunk({"sample": 16}),
        input_core_dims=[["layer", "token", "rank"], ["token"], []],
        output_core_dims=[["layer", "score"]],
        dask="parallelized",
        output_dtypes=[np.float64],
        dask_gufunc_kwargs={"output_sizes": {"score": len(SCORES)}},
        kwargs={"vocabulary": vocabulary, "references": _references(tree, image_index)},
    )
    values = compute(values, progress=progress)
    out = xr.Dataset({name: values.isel(score=i, drop=True) for i, name in enumerate(SCORES)})
    long_names = {
        "precision": "distinct decoded words found in the references / distinct decoded words",
        "token_precision": "image tokens whose decoded word is a reference word / image tokens that decoded to a word",
        "recall": "distinct reference words that were decoded / distinct reference words",
    }
    for name, text in long_names.items():
        out[name].attrs = {"long_name": text}
    out.attrs.update(
        top_k=top_k,
        stop_words=STOPWORDS,
        words="each image token decoded on its own (docs/methods.md)",
        final_norm_applied_to_last=_normed_last(tree),
    )
    return out.assign_coords(sample_coords(acts))


def logit_lens(
    store: StoreLike, *, top_k: int = 1, by: str = "kind", cache: bool = True, progress: bool = False, **kwargs: Any
) -> xr.Dataset:
    """Mean scores over samples per prompt kind (``by="kind"``) or prompt (``by="prompt"``) and layer."""
    per_sample = logit_lens_per_sample(store, top_k=top_k, cache=cache, progress=progress, **kwargs)
    return mean_by(per_sample, by)


def logit_lens_table(
    stores: list[StoreLike], *, top_k: int = 1, by: str = "kind", cache: bool = True, progress: bool = False
) -> pd.DataFrame:
    """Long table over stores: store, model, prompt columns, layer, precision, token_precision, recall, n_samples."""
    return long_table(
        stores,
        lambda tree: logit_lens(tree, top_k=top_k, by=by, cache=cache, progress=progress),
        [*SCORES, "n_samples"],
    )
