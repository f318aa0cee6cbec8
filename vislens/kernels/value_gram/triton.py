"""value_gram on the GPU with Triton (CPU tensors under TRITON_INTERPRET=1).

One program takes a block of tokens and walks D a tile at a time: the head outputs of the tile,
f (H, tokens, tile), come from a batched (over heads) dot of value and W_O^h tiles, and
f f^T is added into the (tokens, H, H) Gram block, so (H, N, D) is never held. Dots run in
fp32 ("ieee": no TF32, no bf16 dot). Block sizes are set for correctness; they have not been
tuned on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vislens.kernels._triton import INTERPRET, MAX_BLOCK, block


@triton.jit
def _value_gram_kernel(
    values,
    w_o,
    gram,
    N,
    D,
    H,
    GROUP,
    d,
    stride_vb,
    stride_vn,
    stride_wk,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # offsets of large batches pass 2**31
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    h = tl.arange(0, BLOCK_H)
    value_cols = (h // GROUP) * d  # where head h's value head starts
    heads_tokens = (h < H)[:, None, None] & (n < N)[None, :, None]
    acc = tl.zeros((BLOCK_N, BLOCK_H, BLOCK_H), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        f = tl.zeros((BLOCK_H, BLOCK_N, BLOCK_K), tl.float32)
        for a0 in range(0, d, BLOCK_A):
            a = a0 + tl.arange(0, BLOCK_A)
            v = tl.load(
                values + b * stride_vb + n[None, :, None] * stride_vn + value_cols[:, None, None] + a[None, None, :],
                mask=heads_tokens & (a < d)[None, None, :],
                other=0,
            )
            w = tl.load(
                w_o + k[None, None, :] * stride_wk + (h * d)[:, None, None] + a[None, :, None],
                mask=(h < H)[:, None, None] & (a < d)[None, :, None] & (k < D)[None, None, :],
                other=0,
            )
            f += tl.dot(v.to(tl.float32), w.to(tl.float32), input_precision="ieee")  # (H, N, K)
        acc += tl.dot(tl.permute(f, (1, 0, 2)), tl.permute(f, (1, 2, 0)), input_precision="ieee")
    out = gram + (b * N + n)[:, None, None] * H * H + h[None, :, None] * H + h[None, None, :]
    tl.store(out, acc, mask=(n < N)[:, None, None] & (h < H)[None, :, None] & (h < H)[None, None, :])


def value_gram(values: torch.Tensor, w_o: torch.Tensor, n_heads: int) -> torch.Tensor:
    """values: (B, N, H_kv * d), w_o: (D, H * d), fp16/bf16/fp32, last dims contiguous
    -> (B, N, H, H) float32."""
    batch, n, width = values.shape
    model_dim = w_o.shape[0]
    d = w_o.shape[1] // n_heads
    gram = torch.empty(batch, n, n_heads, n_heads, dtype=torch.float32, device=values.device)
    block_h = max(16, triton.next_power_of_2(n_heads))  # tl.dot needs 16 or more
    block_n = max(16, block(n, gpu=16, interpreted=64))
    block_a = max(16, block(d, gpu=16, interpreted=128))
    block_k = max(16, block(model_dim, gpu=16, interpreted=MAX_BLOCK // (block_h * max(block_a, block_n))))
    if gram.numel():
        _value_gram_kernel[(batch, triton.cdiv(n, block_n))](
            values,
            w_o,
            gram,
            n,
            model_dim,
            n_heads,
            n_heads // (width // d),
            d,
            values.stride(0),
            values.stride(1),
            w_o.stride(0),
            block_n,
            block_h,
            block_a,
            block_k,
            num_warps=4 if INTERPRET else 8,
        )
    return gram
