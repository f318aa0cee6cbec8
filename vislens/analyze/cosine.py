"""Analysis 2: inter- and intra-modal cosine similarity of hidden states, per layer.

For layer l with image-token states v_1..v_m and text-token states w_1..w_n (every
non-image, non-padding position)::

    inter_modal(l) = 1/(m n) sum_i sum_j cos(v_i, w_j)
    intra_image(l) = mean over pairs i != j of cos(v_i, v_j)   (likewise intra_text)

computed per sample with the one-pass identity of `vislens.kernels.mean_cosine`, then
averaged over samples per prompt kind.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import xarray as xr

from vislens.analyze.common import StoreLike, as_text, finished, group, long_table
from vislens.store import IMAGE, TEXT

STATS = ("inter_modal", "intra_image", "intra_text")


def _intra(h: torch.Tensor, mask: torch.Tensor, backend: str) -> torch.Tensor:
    """Mean cosine over ordered pairs i != j of the masked rows, from the all-pairs mean (NaN below two rows)."""
    from vislens.kernels import mean_cosine

    all_pairs = mean_cosine(h, h, a_mask=mask, b_mask=mask, backend=backend)
    m = mask.sum(-1).to(torch.float32)
    nonzero = ((h.float().norm(dim=-1) > 0) & mask).sum(-1).to(torch.float32)
    mean = (m * m * all_pairs - nonzero) / (m * (m - 1))
    return torch.where(m > 1, mean, torch.nan)  # one row has no pairs (InstructBLIP's empty prompt: BOS alone)


def _block_stats(hidden: np.ndarray, modality: np.ndarray, backend: str) -> np.ndarray:
    """(k, layer, token, hidden) and (k, token) -> (k, layer, 3) float32."""
    from vislens.kernels import mean_cosine

    h = torch.from_numpy(np.ascontiguousarray(hidden))
    mod = torch.from_numpy(np.ascontiguousarray(modality))[:, None, :].expand(h.shape[:-1])
    image, text = mod == IMAGE, mod == TEXT
    inter = mean_cosine(h, h, a_mask=image, b_mask=text, backend=backend)
    out = torch.stack([inter, _intra(h, image, backend), _intra(h, text, backend)], dim=-1)
    return out.numpy().astype(np.float32)


def cosine_per_sample(store: StoreLike, *, backend: str = "auto", samples_per_task: int = 4) -> xr.Dataset:
    """Per finished sample and layer: ``inter_modal``, ``intra_image``, ``intra_text``.

    Lazy (Dask): one task per ``samples_per_task`` samples; call ``.compute()``, or let
    `cosine` do it, under any Dask scheduler (threads, or a distributed cluster).
    """
    acts = finished(group(store, "activations"))
    hidden = acts["hidden"].chunk({"sample": samples_per_task, "layer": -1, "token": -1, "hidden": -1})
    modality = acts["modality"].chunk({"sample": samples_per_task, "token": -1})
    stats = xr.apply_ufunc(
        _block_stats,
        hidden,
        modality,
        input_core_dims=[["layer", "token", "hidden"], ["token"]],
        output_core_dims=[["layer", "stat"]],
        dask="parallelized",
        output_dtypes=[np.float32],
        dask_gufunc_kwargs={"output_sizes": {"stat": len(STATS)}},
        kwargs={"backend": backend},
    )
    out = xr.Dataset({name: stats.isel(stat=i, drop=True) for i, name in enumerate(STATS)})
    return out.assign_coords(prompt_kind=as_text(acts["prompt_kind"]), image_id=as_text(acts["image_id"]))


def cosine(store: StoreLike, *, backend: str = "auto", samples_per_task: int = 4) -> xr.Dataset:
    """Mean over samples of each statistic, per prompt kind and layer (dims prompt_kind, layer).

    Parameters
    ----------
    store : an opened store (`vislens.open_store`), its ``activations`` Dataset, or a URL.
    backend : kernel backend for `vislens.kernels.mean_cosine`.
    """
    per_sample = cosine_per_sample(store, backend=backend, samples_per_task=samples_per_task).compute()
    means = per_sample.drop_vars("image_id").groupby("prompt_kind").mean("sample")
    means["n_samples"] = per_sample["inter_modal"].isel(layer=0).groupby("prompt_kind").count("sample")
    return means


def cosine_table(stores: list[StoreLike], *, backend: str = "auto") -> pd.DataFrame:
    """Long table over stores: store, model, prompt_kind, layer, inter_modal, intra_*, n_samples."""
    return long_table(stores, lambda tree: cosine(tree, backend=backend), [*STATS, "n_samples"])
