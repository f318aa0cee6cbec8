"""Norm-based attention on the CPU: one source token (a column of attention) per task.

Fixed order, the same bits whatever the thread count or the CPU: a^T G a is summed as
G a (ga[h] = sum_k G[h, k] a[k], k upwards, vectorised across h) and then a . ga (h upwards), each
product rounded and added in fp32 (no fast-math flags: no reassociation, no fused multiply-add).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from vislens.kernels._numba import as_numpy, to_f32


@njit(cache=True)
def _column(attn, gram, b, j, per_head, summed):
    heads, queries = attn.shape[1], attn.shape[2]
    g = gram[b, j]
    columns = g.T.copy()  # columns[k, h] = G[h, k]: contiguous over h
    head_norms = np.empty(heads, np.float32)
    for h in range(heads):
        head_norms[h] = np.sqrt(max(g[h, h], np.float32(0)))
    a = np.empty(heads, np.float32)
    ga = np.empty(heads, np.float32)
    for q in range(queries):
        for h in range(heads):
            a[h] = to_f32(attn[b, h, q, j])
            per_head[b, h, q, j] = a[h] * head_norms[h]
        ga[:] = 0
        for k in range(heads):
            ak, column = a[k], columns[k]
            for h in range(heads):
                ga[h] = ga[h] + column[h] * ak
        squared = np.float32(0)
        for h in range(heads):
            squared = squared + a[h] * ga[h]
        summed[b, q, j] = np.sqrt(max(squared, np.float32(0)))


@njit(parallel=True, cache=True)
def _norm_attention(attn, gram, per_head, summed):
    batch, n = attn.shape[0], attn.shape[3]
    for job in prange(batch * n):
        _column(attn, gram, job // n, job % n, per_head, summed)


def norm_attention(attn: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """attn: (B, H, Q, N) fp16/bf16/fp32 contiguous; gram: (B, N, H, H) float32 contiguous.

    Returns per_head (B, H, Q, N) and summed (B, Q, N), float32.
    """
    batch, heads, queries, n = attn.shape
    per_head = np.empty((batch, heads, queries, n), np.float32)
    summed = np.empty((batch, queries, n), np.float32)
    _norm_attention(as_numpy(attn), gram.numpy(), per_head, summed)
    return torch.from_numpy(per_head), torch.from_numpy(summed)
