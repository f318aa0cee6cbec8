"""Logit lens top-k (METHODS.md, analysis 1): final norm, unembedding, top k, fused.

The (rows, vocabulary) logits are never held whole: the Triton kernel and the torch backend walk
the vocabulary in tiles with a running top k; the CPU backend screens every logit in int8 with
a certified error bound and computes exactly only the few it cannot rule out.

Which ids, in which order: reference.py defines them (fp32 logits rounded once from the exact
dot product of the normed fp32 row and the unembedding row; larger value first, ties to the
smaller id). The numba (CPU) backend returns exactly those ids and values. The Triton and torch
backends apply the same tie rule to fp32 logits summed in their own order, so their ids can
differ from the reference only where two logits lie within fp32 rounding of each other.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vislens.kernels._backend import load, resolve
from vislens.kernels.lens_topk import eager
from vislens.kernels.lens_topk.reference import apply_norm
from vislens.kernels.lens_topk.spec import LensNorm, LensUnembedding, as_norm, prepare_unembedding

__all__ = ["LensNorm", "LensUnembedding", "lens_topk", "prepare_unembedding"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def lens_topk(
    hidden: torch.Tensor,
    unembedding: torch.Tensor | np.ndarray | LensUnembedding,
    k: int,
    *,
    norm: Any | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits norm(hidden) @ unembedding.T of every row, and their vocabulary ids.

    Parameters
    ----------
    hidden : (..., d) float16, bfloat16 or float32, e.g. one layer's image-token hidden states.
    unembedding : (vocab, d) float16, bfloat16 or float32 (tensor or numpy array), or a
        LensUnembedding from `prepare_unembedding`, which keeps what the CPU backend derives
        from the matrix (its int8 form) across calls: use one for repeated calls.
    k : 1 <= k <= vocab.
    norm : None (rows are already normed, e.g. the last layer) or the final norm: any object
        with kind ("rms" | "rms_offset" | "layer"), eps, weight and bias, such as a LensNorm or
        the extraction adapters' NormSpec.
    backend : "auto" | "triton" | "numba" | "torch"; "auto" picks Triton for CUDA tensors and
        numba (the exact CPU path) for CPU tensors.

    Returns
    -------
    values : (..., k) float32, largest first; ids : (..., k) int64. Ties go to the smaller id.
    """
    prepared = prepare_unembedding(unembedding)
    weight = prepared.weight
    if hidden.dtype not in _DTYPES or weight.dtype not in _DTYPES or hidden.dim() < 1:
        raise ValueError(
            f"hidden (..., d) and unembedding (vocab, d) must be float16, bfloat16 or float32, got "
            f"{hidden.dtype} {tuple(hidden.shape)} and {weight.dtype} {tuple(weight.shape)}"
        )
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden has {hidden.shape[-1]} features but the unembedding has {weight.shape[1]}")
    if not 1 <= k <= weight.shape[0]:
        raise ValueError(f"k must be between 1 and the vocabulary size {weight.shape[0]}, got {k}")
    name = resolve(backend, hidden, weight)
    lead, d = hidden.shape[:-1], hidden.shape[-1]
    rows = hidden.detach().reshape(-1, d)
    spec = as_norm(norm, d, hidden.device)
    if name == "triton":
        values, ids = load(__name__, "triton").lens_topk(rows.contiguous(), weight.contiguous(), k, spec)
    else:
        x = apply_norm(rows.float().contiguous(), spec)
        if name == "torch":
            values, ids = eager.lens_topk(x, weight, k)
        else:
            module = load(__name__, "numba")
            values, ids, _ = module.topk(x, prepared.derived("numba", module.prepare), k)
    return values.reshape(*lead, k), ids.reshape(*lead, k)
