"""Norm-based attention (docs/methods.md, analysis 3): attention weights scaled by what they move.

Fused: from the attention weights and the per-token Gram matrices of the head outputs
(`value_gram`), nothing of size Q x N x H x H is formed.
"""

from __future__ import annotations

import math

import torch

from vislens.kernels._backend import load, resolve
from vislens.kernels.norm_attention import reference

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def norm_attention(
    attn: torch.Tensor, gram: torch.Tensor, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head and head-summed norms of the attention-weighted head outputs.

    Parameters
    ----------
    attn : (..., H, Q, N) float16, bfloat16 or float32 attention weights alpha^h_qj (the query
        rows wanted, e.g. the text tokens, against every source token j).
    gram : (..., N, H, H) float32 Gram matrices G_j[h, h'] = f_h(x_j) . f_h'(x_j), from
        `value_gram`.
    backend : "auto" | "triton" | "numba" | "torch" ("torch" evaluates a^T G a with einsum).

    Returns
    -------
    per_head : (..., H, Q, N) float32, alpha^h_qj |f_h(x_j)| = alpha^h_qj sqrt(G_j[h, h]).
    summed : (..., Q, N) float32, |sum_h alpha^h_qj f_h(x_j)| = sqrt(a^T G_j a), a = alpha[..., q, j].
    """
    if attn.dtype not in _DTYPES or attn.dim() < 3:
        raise ValueError(f"attn must be float16/bfloat16/float32 (..., H, Q, N), got {attn.dtype} {tuple(attn.shape)}")
    *lead, heads, queries, n = attn.shape
    if tuple(gram.shape) != (*lead, n, heads, heads):
        raise ValueError(
            f"gram must be (..., N, H, H) = {(*lead, n, heads, heads)} to match attn "
            f"{tuple(attn.shape)}, got {tuple(gram.shape)}"
        )
    name = resolve(backend, attn, gram)
    attn, gram = attn.detach(), gram.detach()
    if name == "torch":
        return reference.norm_attention(attn, gram)
    batch = math.prod(lead)
    per_head, summed = load(__name__, name).norm_attention(
        attn.reshape(batch, heads, queries, n).contiguous(),
        gram.float().reshape(batch, n, heads, heads).contiguous(),
    )
    return per_head.reshape(attn.shape), summed.reshape(*lead, queries, n)
