"""lens_topk on the GPU with Triton (CPU tensors under TRITON_INTERPRET=1).

Grid: (row blocks, vocabulary splits). A program normalises its rows on the fly (statistics
first, then each hidden tile as it is loaded), walks its share of the vocabulary a tile at a
time (fp32 logits from tl.dot, "ieee": no TF32), and keeps a running top K per row as int64
keys that order (value, id) by the tie rule (see eager.keys): K max-and-remove passes merge a
tile into the running keys, skipped when no logit of the tile beats a row's K-th. Each split
writes its K keys; one torch.topk over the splits' keys finishes. The (rows, vocabulary) logits
never exist. Block sizes are set for correctness; they have not been tuned on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vislens.kernels._triton import INTERPRET, MAX_BLOCK, block
from vislens.kernels.lens_topk import eager
from vislens.kernels.lens_topk.spec import LensNorm

_NONE, _RMS, _LAYER = 0, 1, 2
_EMPTY = tl.constexpr(-(2**62))  # below every key of a finite fp32 value (kernels read only constexpr globals)


@triton.jit
def _keys(logits, cols):
    """eager.keys in Triton: larger value, or equal value and smaller id, gives a larger key."""
    bits = tl.where(logits == 0, 0.0, logits).to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
    return ordered * 4294967296 + (4294967295 - cols.to(tl.int64))[None, :]


@triton.jit
def _lens_topk_kernel(
    x,
    w,
    norm_w,
    norm_b,
    partial,
    M,
    V,
    D,
    eps,
    weight_offset,
    stride_x,
    stride_w,
    vocab_per_split,
    NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    row_ok = rows < M
    x_rows = x + rows.to(tl.int64)[:, None] * stride_x
    # the final norm's statistics, in fp32
    mean = tl.zeros((BLOCK_M,), tl.float32)
    rstd = tl.full((BLOCK_M,), 1.0, tl.float32)
    if NORM == 2:
        total = tl.zeros((BLOCK_M,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dk = d0 + tl.arange(0, BLOCK_D)
            xk = tl.load(x_rows + dk[None, :], mask=row_ok[:, None] & (dk < D)[None, :], other=0).to(tl.float32)
            total += tl.sum(xk, axis=1)
        mean = total / D
    if NORM != 0:
        squares = tl.zeros((BLOCK_M,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dk = d0 + tl.arange(0, BLOCK_D)
            ok = row_ok[:, None] & (dk < D)[None, :]
            xk = tl.load(x_rows + dk[None, :], mask=ok, other=0).to(tl.float32)
            centred = tl.where(ok, xk - mean[:, None], 0.0)
            squares += tl.sum(centred * centred, axis=1)
        rstd = 1.0 / tl.sqrt(squares / D + eps)
    # the vocabulary share of this split, a tile at a time, with a running top K of keys
    slot = tl.arange(0, KP)
    run = tl.full((BLOCK_M, KP), _EMPTY, tl.int64)
    v_start = split * vocab_per_split
    v_stop = tl.minimum(v_start + vocab_per_split, V)
    for v0 in range(v_start, v_stop, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_stop
        logits = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dk = d0 + tl.arange(0, BLOCK_D)
            d_ok = dk < D
            xk = tl.load(x_rows + dk[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0).to(tl.float32)
            if NORM != 0:
                scale = tl.load(norm_w + dk, mask=d_ok, other=0) + weight_offset
                xk = (xk - mean[:, None]) * rstd[:, None] * scale[None, :]
                if HAS_BIAS:
                    xk += tl.load(norm_b + dk, mask=d_ok, other=0)[None, :]
                xk = tl.where(d_ok[None, :], xk, 0.0)
            wk = tl.load(
                w + cols.to(tl.int64)[:, None] * stride_w + dk[None, :],
                mask=col_ok[:, None] & d_ok[None, :],
                other=0,
            ).to(tl.float32)
            logits += tl.dot(xk, tl.trans(wk), input_precision="ieee")
        keys = tl.where(col_ok[None, :], _keys(logits, cols), _EMPTY)
        kth = tl.sum(tl.where(slot[None, :] == K - 1, run, 0), axis=1)
        if tl.sum((tl.max(keys, axis=1) > kth).to(tl.int32), axis=0) > 0:
            merged = tl.full((BLOCK_M, KP), _EMPTY, tl.int64)
            for r in tl.static_range(K):
                best = tl.maximum(tl.max(keys, axis=1), tl.max(run, axis=1))
                merged = tl.where(slot[None, :] == r, best[:, None], merged)
                keys = tl.where(keys == best[:, None], _EMPTY, keys)
                run = tl.where(run == best[:, None], _EMPTY, run)
            run = merged
    out = partial + (rows.to(tl.int64)[:, None] * tl.num_programs(1) + split) * KP + slot[None, :]
    tl.store(out, run, mask=row_ok[:, None])


def lens_topk(
    hidden: torch.Tensor, weight: torch.Tensor, k: int, norm: LensNorm | None, *, splits: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (rows, d), weight (vocab, d), fp16/bf16/fp32, last dims contiguous
    -> (rows, k) float32 values, int64 ids. splits: vocabulary splits (default: enough programs
    to fill a GPU, one under the interpreter)."""
    rows, d = hidden.shape
    vocab = weight.shape[0]
    kp = triton.next_power_of_2(k)
    block_m = max(16, block(rows, gpu=64, interpreted=64))
    block_d = max(16, block(d, gpu=32, interpreted=128))
    block_v = max(16, block(vocab, gpu=64, interpreted=min(1024, MAX_BLOCK // (block_m * block_d))))
    row_blocks = triton.cdiv(rows, block_m)
    # enough programs to fill a GPU; under the interpreter every program costs ~2 ms
    if splits is None:
        splits = 1 if INTERPRET else max(1, min(triton.cdiv(vocab, 8 * block_v), triton.cdiv(1024, row_blocks)))
    vocab_per_split = triton.cdiv(triton.cdiv(vocab, splits), block_v) * block_v
    splits = triton.cdiv(vocab, vocab_per_split)
    partial = torch.empty(rows, splits, kp, dtype=torch.int64, device=hidden.device)
    kind = _NONE if norm is None else (_LAYER if norm.kind == "layer" else _RMS)
    dummy = torch.zeros(1, dtype=torch.float32, device=hidden.device)
    norm_w = dummy if norm is None else norm.weight
    norm_b = dummy if norm is None or norm.bias is None else norm.bias
    if rows:
        _lens_topk_kernel[(row_blocks, splits)](
            hidden,
            weight,
            norm_w,
            norm_b,
            partial,
            rows,
            vocab,
            d,
            0.0 if norm is None else float(norm.eps),
            1.0 if norm is not None and norm.kind == "rms_offset" else 0.0,
            hidden.stride(0),
            weight.stride(0),
            vocab_per_split,
            NORM=kind,
            HAS_BIAS=norm is not None and norm.bias is not None,
            K=k,
            KP=kp,
            BLOCK_M=block_m,
            BLOCK_V=block_v,
            BLOCK_D=block_d,
            num_warps=4,
        )
    best = partial.reshape(rows, splits * kp).topk(k, dim=1).values
    return eager.unkey(best)
