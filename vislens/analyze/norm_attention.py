"""Analysis 3: norm-based attention (Kobayashi et al., 2020) from the store's attention group.

NA(q, j) = |sum_h alpha^h_qj f_h(x_j)|, the head-summed norm of what query q takes from source
token j (`vislens.kernels.norm_attention`, from ``attn`` and ``value_gram``). Layer l is the
attention inside decoder layer l, numbered 1 .. L as in the store (its input is hidden state
l - 1 and its output hidden state l, the numbering of the other analyses).

- ``image_share`` (per layer): for each text query row q, sum over image tokens j of NA(q, j)
  divided by the sum over all j of NA(q, j); the mean over the text query rows of a sample,
  then over samples. ``image_share_after_image`` does the same over the text queries that come
  after the first image token only (earlier ones cannot see the image).
- ``last_query``: NA from the last prompt token to every token (the study's heatmaps).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import xarray as xr

from vislens.analyze.common import (
    StoreLike,
    as_text,
    as_tree,
    compute,
    finished,
    group,
    label,
    long_table,
    mean_by,
    sample_coords,
)
from vislens.errors import StoreFormatError
from vislens.store import IMAGE, TEXT


def _block(
    attn: np.ndarray,
    gram: np.ndarray,
    query_pos: np.ndarray,
    modality: np.ndarray,
    n_tokens: np.ndarray,
    *,
    backend: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sample of a block: image share, share after the image (layer,), last-query NA (layer, token)."""
    from vislens.kernels import norm_attention
    from vislens.kernels.sample_stats import attention_shares

    s, n_layers = attn.shape[:2]
    share = np.full((s, n_layers), np.nan)
    after = np.full((s, n_layers), np.nan)
    last = np.zeros((s, n_layers, attn.shape[-1]), dtype=np.float32)
    for i in range(s):
        rows = np.flatnonzero(query_pos[i] >= 0)
        n = int(n_tokens[i])
        _, summed = norm_attention(
            torch.from_numpy(attn[i][:, :, rows, :n]), torch.from_numpy(gram[i][:, :n]), backend=backend
        )
        positions = query_pos[i][rows]
        shares = attention_shares(
            summed,
            torch.from_numpy(positions),
            torch.from_numpy(modality[i][:n] == IMAGE),
            torch.from_numpy(modality[i][positions] == TEXT),
        )
        share[i], after[i], last[i, :, :n] = (x.numpy() for x in shares)
    return share, after, last


STAT_GROUP = "norm_attention"
"""``results/norm_attention``: these statistics computed during extraction (``--compute norm-attention``)."""


def _from_results(tree: xr.DataTree, keep: np.ndarray) -> xr.Dataset | None:
    if "results" not in tree.children or STAT_GROUP not in tree["results"].children:
        return None
    ds = tree["results"][STAT_GROUP].to_dataset(inherit=False)
    share = ds.get("image_share")
    if share is None or share.attrs.get("source_fingerprint") != tree.attrs.get("vislens_fingerprint"):
        return None
    return ds[["image_share", "image_share_after_image", "last_query"]].sel(sample=keep)


def norm_attention_per_sample(
    store: StoreLike, *, backend: str = "auto", samples_per_task: int = 2, source: str = "auto"
) -> xr.Dataset:
    """Lazy per finished sample: ``image_share``, ``image_share_after_image`` (sample, layer) and
    ``last_query`` (sample, layer, token), NaN/0 where a sample has no such query row.

    ``source``: ``auto`` reads the statistics computed during extraction (``--compute
    norm-attention``) when the store has them, else computes them from the attention group;
    ``attention`` always computes; ``results`` always reads.
    """
    tree = as_tree(store)
    acts = group(tree, "activations")
    keep = finished(acts)["sample"].values
    stored = _from_results(tree, keep) if source != "attention" else None
    if stored is not None:
        stored.attrs["source"] = "computed during extraction (results/norm_attention)"
        return _labelled(stored, acts.sel(sample=keep))
    if source == "results":
        raise StoreFormatError("this store has no norm-attention statistics computed during extraction")
    if "attention" not in tree.children:
        keep_attrs = tree.attrs.get("keep", [])
        raise StoreFormatError(
            f"this store holds no attention group (extracted with --attention {tree.attrs.get('attention_mode', '?')} "
            f"--keep {','.join(keep_attrs) or 'none'}): norm-based attention needs it, or --compute norm-attention "
            "during extraction; re-extract with --attention text (or last/all) and --keep attention"
        )
    attention = group(tree, "attention")
    acts, attention = acts.sel(sample=keep), attention.sel(sample=keep)
    chunks = {"sample": samples_per_task}
    share, after, last = xr.apply_ufunc(
        _block,
        attention["attn"].chunk(chunks | {"layer": -1, "head": -1, "query": -1, "token": -1}),
        attention["value_gram"].chunk(chunks | {"layer": -1, "token": -1, "head": -1, "head2": -1}),
        attention["query_pos"].chunk(chunks | {"query": -1}),
        acts["modality"].chunk(chunks | {"token": -1}),
        acts["n_tokens"].chunk(chunks),
        input_core_dims=[
            ["layer", "head", "query", "token"],
            ["layer", "token", "head", "head2"],
            ["query"],
            ["token"],
            [],
        ],
        output_core_dims=[["layer"], ["layer"], ["layer", "token"]],
        dask="parallelized",
        output_dtypes=[np.float64, np.float64, np.float32],
        kwargs={"backend": backend},
    )
    out = xr.Dataset({"image_share": share, "image_share_after_image": after, "last_query": last})
    out["layer"] = attention["layer"]
    out.attrs["source"] = "computed from the attention group"
    return _labelled(out, acts)


def _labelled(out: xr.Dataset, acts: xr.Dataset) -> xr.Dataset:
    long_names = {
        "image_share": "share of the text queries' norm-based attention on image tokens",
        "image_share_after_image": "share of norm-based attention on image tokens, text queries after the first image token",
        "last_query": "norm-based attention from the last prompt token to each token",
    }
    for name, text in long_names.items():
        out[name].attrs = {"long_name": text}
    return out.assign_coords(sample_coords(acts))


def norm_attention(store: StoreLike, *, by: str = "kind", backend: str = "auto", progress: bool = False) -> xr.Dataset:
    """Mean image shares over samples per prompt kind or prompt (``by``) and layer."""
    per_sample = compute(
        norm_attention_per_sample(store, backend=backend)[["image_share", "image_share_after_image"]], progress=progress
    )
    return mean_by(per_sample, by)


def norm_attention_table(
    stores: list[StoreLike], *, by: str = "kind", backend: str = "auto", progress: bool = False
) -> pd.DataFrame:
    """Long table: store, model, prompt columns, layer, image_share, image_share_after_image, n_samples."""
    return long_table(
        stores,
        lambda tree: norm_attention(tree, by=by, backend=backend, progress=progress),
        ["image_share", "image_share_after_image", "n_samples"],
    )


def pick_samples(store: StoreLike, chosen: list[str] | None = None, n: int = 3) -> list[int]:
    """Sample indices from ids (``image_id``, ``image_id:prompt_kind`` or a sample number); default: the first n done."""
    acts = finished(group(as_tree(store), "activations"))
    if not chosen:
        return [int(s) for s in acts["sample"].values[:n]]
    ids, kinds = as_text(acts["image_id"]).values, as_text(acts["prompt_kind"]).values
    picked = []
    for item in chosen:
        if item.isdigit() and int(item) in acts["sample"].values:
            picked.append(int(item))
            continue
        image, _, kind = item.partition(":")
        hits = np.flatnonzero((ids == image) & ((kinds == kind) if kind else True))
        if hits.size == 0:
            raise StoreFormatError(
                f"no finished sample for {item!r}; use an image id, image_id:prompt_kind, or a sample number"
            )
        picked.append(int(acts["sample"].values[hits[0]]))
    return picked


def last_query_heatmap(store: StoreLike, sample: int, *, backend: str = "auto") -> xr.DataArray:
    """NA from the last prompt token to every valid token: (layer, token) for one sample."""
    tree = as_tree(store)
    per = norm_attention_per_sample(tree, backend=backend).sel(sample=[sample]).compute()
    n = int(group(tree, "activations")["n_tokens"].sel(sample=sample))
    heat = per["last_query"].isel(sample=0, token=slice(0, n))
    return heat.assign_attrs(image_id=str(per["image_id"].values[0]), prompt_kind=str(per["prompt_kind"].values[0]))


def top_image_tokens(store: StoreLike, samples: list[int], *, top: int = 10, backend: str = "auto") -> pd.DataFrame:
    """The most-attended image tokens (last prompt token's NA) per sample and layer, with their
    place in the patch grid (row, col; -1 when the grid is unknown)."""
    tree = as_tree(store)
    acts = group(tree, "activations")
    per = norm_attention_per_sample(tree, backend=backend).sel(sample=samples).compute()
    rows = []
    for s in samples:
        modality = acts["modality"].sel(sample=s).values
        image_pos = np.flatnonzero(modality == IMAGE)
        grid_rows, grid_cols = (int(v) for v in acts["image_grid"].sel(sample=s).values)
        heat = per["last_query"].sel(sample=s).values[:, image_pos]  # (layer, image tokens)
        for row_of_layer, layer in enumerate(per["layer"].values):
            order = np.argsort(-heat[row_of_layer], kind="stable")[:top]
            for rank, k in enumerate(order):
                gridded = grid_cols > 0 and grid_rows * grid_cols == image_pos.size
                rows.append(
                    {
                        "store": label(tree),
                        "sample": s,
                        "image_id": str(acts["image_id"].sel(sample=s).values),
                        "prompt_kind": str(acts["prompt_kind"].sel(sample=s).values),
                        "layer": int(layer),
                        "rank": rank,
                        "image_token": int(k),
                        "position": int(image_pos[k]),
                        "row": int(k // grid_cols) if gridded else -1,
                        "col": int(k % grid_cols) if gridded else -1,
                        "norm_attention": float(heat[row_of_layer, k]),
                    }
                )
    return pd.DataFrame(rows)
