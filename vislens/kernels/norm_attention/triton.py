"""Norm-based attention on the GPU with Triton (CPU tensors under TRITON_INTERPRET=1).

One program takes a (query block, source block) tile with all heads of the attention in
registers, and walks the heads h, adding a_h * (G[h, :] . a) into a^T G a.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vislens.kernels._triton import MAX_BLOCK, block


@triton.jit
def _norm_attention_kernel(
    attn, gram, per_head, summed, H, Q, N, BLOCK_H: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr
):
    b = tl.program_id(0).to(tl.int64)  # offsets of large batches pass 2**31
    q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_H)
    tile = (q < Q)[:, None] & (n < N)[None, :]
    tile_offsets = q[:, None] * N + n[None, :]
    attn = attn + b * H * Q * N
    a = tl.load(
        attn + k[:, None, None] * Q * N + tile_offsets[None, :, :],
        mask=(k < H)[:, None, None] & tile[None, :, :],
        other=0,
    ).to(tl.float32)  # (H, Q, N)
    gram_rows = gram + b * N * H * H + n * H * H  # G_n[0, 0] for each source n
    squared = tl.zeros((BLOCK_Q, BLOCK_N), tl.float32)
    for h in range(H):
        g = tl.load(gram_rows[None, :] + h * H + k[:, None], mask=(k < H)[:, None] & (n < N)[None, :], other=0)
        ga = tl.sum(a * g[:, None, :], axis=0)  # (G_n a)_h for every (q, n)
        a_h = tl.load(attn + h * Q * N + tile_offsets, mask=tile, other=0).to(tl.float32)
        squared += a_h * ga
        g_hh = tl.load(gram_rows + h * H + h, mask=n < N, other=0)
        head_norm = tl.sqrt(tl.maximum(g_hh, 0.0))
        tl.store(per_head + (b * H + h) * Q * N + tile_offsets, a_h * head_norm[None, :], mask=tile)
    tl.store(summed + b * Q * N + tile_offsets, tl.sqrt(tl.maximum(squared, 0.0)), mask=tile)


def norm_attention(attn: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """attn: (B, H, Q, N) fp16/bf16/fp32 contiguous; gram: (B, N, H, H) float32 contiguous.

    Returns per_head (B, H, Q, N) and summed (B, Q, N), float32.
    """
    batch, heads, queries, n = attn.shape
    per_head = torch.empty(attn.shape, dtype=torch.float32, device=attn.device)
    summed = torch.empty(batch, queries, n, dtype=torch.float32, device=attn.device)
    block_h = triton.next_power_of_2(heads)
    block_q = block(queries, gpu=16, interpreted=64)
    block_n = block(n, gpu=16, interpreted=MAX_BLOCK // (block_h * block_q))
    grid = (batch, triton.cdiv(queries, block_q), triton.cdiv(n, block_n))
    if per_head.numel():
        _norm_attention_kernel[grid](attn, gram, per_head, summed, heads, queries, n, block_h, block_q, block_n)
    return per_head, summed
