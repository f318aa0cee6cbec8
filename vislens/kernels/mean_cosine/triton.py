"""mean_cosine on the GPU with Triton (CPU tensors under TRITON_INTERPRET=1).

One program takes a block of rows of one group: it reads them once for the squared norms and
again (from cache) to add the unit rows into a per-block partial sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vislens.kernels._triton import MAX_BLOCK, block


@triton.jit
def _unit_sums_kernel(flat, offsets, partial, m, d, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)  # offsets of large batches pass 2**31
    blk = tl.program_id(1)
    rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    starts = tl.load(offsets + g * m + rows, mask=rows < m, other=-1)
    valid = starts >= 0
    squares = tl.zeros((BLOCK_M,), tl.float32)
    for k in range(0, d, BLOCK_D):
        cols = k + tl.arange(0, BLOCK_D)
        x = tl.load(flat + starts[:, None] + cols[None, :], mask=valid[:, None] & (cols < d)[None, :], other=0)
        x = x.to(tl.float32)
        squares += tl.sum(x * x, axis=1)
    inv = tl.where(squares > 0, 1.0 / tl.sqrt(tl.where(squares > 0, squares, 1.0)), 0.0)
    out = partial + (g * tl.num_programs(1) + blk) * d
    for k in range(0, d, BLOCK_D):
        cols = k + tl.arange(0, BLOCK_D)
        x = tl.load(flat + starts[:, None] + cols[None, :], mask=valid[:, None] & (cols < d)[None, :], other=0)
        tl.store(out + cols, tl.sum(x.to(tl.float32) * inv[:, None], axis=0), mask=cols < d)


@triton.jit
def _unit_dots_kernel(flat, offsets, u, out, m, d, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)  # offsets of large batches pass 2**31
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    starts = tl.load(offsets + g * m + rows, mask=rows < m, other=-1)
    valid = starts >= 0
    squares = tl.zeros((BLOCK_M,), tl.float32)
    dots = tl.zeros((BLOCK_M,), tl.float32)
    for k in range(0, d, BLOCK_D):
        cols = k + tl.arange(0, BLOCK_D)
        x = tl.load(flat + starts[:, None] + cols[None, :], mask=valid[:, None] & (cols < d)[None, :], other=0)
        x = x.to(tl.float32)
        v = tl.load(u + g * d + cols, mask=cols < d, other=0)
        squares += tl.sum(x * x, axis=1)
        dots += tl.sum(x * v[None, :], axis=1)
    inv = tl.where(squares > 0, 1.0 / tl.sqrt(tl.where(squares > 0, squares, 1.0)), 0.0)
    result = dots * inv  # NaN when u is (b had no valid row), even for a zero row
    tl.store(out + g * m + rows, tl.where(valid, result, float("nan")), mask=rows < m)


def _blocks(m: int, d: int) -> tuple[int, int]:
    block_d = block(d, gpu=512)
    return block(m, gpu=16, interpreted=MAX_BLOCK // block_d), block_d


def unit_sums(flat: torch.Tensor, offsets: torch.Tensor, d: int) -> torch.Tensor:
    """Sum of x/|x| over the valid rows of each group: (G, d) float32.

    flat: 1-D fp16/bf16/fp32 storage; offsets: (G, m) int64 row starts in it, -1 for masked rows.
    """
    groups, m = offsets.shape
    block_m, block_d = _blocks(m, d)
    partial = torch.zeros(groups, triton.cdiv(m, block_m), d, dtype=torch.float32, device=flat.device)
    if partial.numel():
        _unit_sums_kernel[(groups, partial.shape[1])](flat, offsets, partial, m, d, block_m, block_d)
    return partial.sum(1)


def unit_dots(flat: torch.Tensor, offsets: torch.Tensor, d: int, u: torch.Tensor) -> torch.Tensor:
    """(x/|x|) . u[g] for every row x of group g: (G, m) float32, NaN for masked rows.

    flat, offsets as in `unit_sums`; u: (G, d) float32 contiguous.
    """
    groups, m = offsets.shape
    block_m, block_d = _blocks(m, d)
    out = torch.empty(groups, m, dtype=torch.float32, device=flat.device)
    if out.numel():
        _unit_dots_kernel[(groups, triton.cdiv(m, block_m))](flat, offsets, u, out, m, d, block_m, block_d)
    return out
