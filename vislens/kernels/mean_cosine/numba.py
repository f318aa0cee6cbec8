"""mean_cosine on the CPU: one pass over the rows, software-pipelined, in a fixed order.

Rows are read through `flat` (the input's storage) at `offsets` (row starts, -1 for masked
rows), so strided inputs are never copied. Rows go four at a time: while block b is added to
the sum, the squared norms of block b+1 are taken, so memory is read while the sum is computed;
this takes the kernel from ~70% to ~100% of the measured memory bandwidth.

Fixed order: the same bits whatever the thread count or the CPU. A group's rows are split into
tasks of `ROWS_PER_TASK` row positions (a constant, not a share of the threads); each task adds
its rows in row order (four at a time, ((p0 w0 + p1 w1) + p2 w2) + p3 w3 per element), and the
task sums are added in task order. A squared norm or a dot product sums its elements in `LANES`
lanes held in memory (element t goes to lane t mod LANES, in order), the lanes add up in a fixed
pairwise tree, and the elements after the last full set of lanes follow one by one. Nothing is
compiled with fast-math flags, so LLVM vectorises the loops across lanes and elements (a loop
of LANES independent lanes is long enough for its loop vectoriser) but never reorders a sum or
fuses a multiply-add: an AVX2, an AVX-512 and an SSE2 build give the same bits.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from vislens.kernels._numba import as_numpy, to_f32

ROWS_PER_TASK = 64  # row positions per task: fixed, so the order of the sums never follows the threads
LANES = 64


@njit(cache=True)
def _inv_norm(squared):
    return np.float32(1) / np.sqrt(squared) if squared > 0 else np.float32(0)


@njit(cache=True)
def _lane_total(lanes):
    """Sum of the LANES lanes in a fixed pairwise tree (the lanes are overwritten)."""
    width = LANES // 2
    while width >= 1:
        for j in range(width):
            lanes[j] = lanes[j] + lanes[j + width]
        width //= 2
    return lanes[0]


@njit(cache=True)
def _norms_finish(rows, body, s):
    """1/|r| of the rows whose first `body` squares sit in the lanes s[r], plus their tails."""
    out = np.empty(len(rows), np.float32)
    for r in range(len(rows)):
        total = _lane_total(s[r])
        row = rows[r]
        for k in range(body, row.size):
            v = to_f32(row[k])
            total = total + v * v
        out[r] = _inv_norm(total)
    return out


@njit(cache=True)
def _squares4(r0, r1, r2, r3, s):
    """1/|r| of four rows (0 for a zero row); s: (4, LANES) float32 scratch."""
    s[:] = 0
    body = r0.size - r0.size % LANES
    a0, a1, a2, a3 = s[0], s[1], s[2], s[3]
    for k in range(0, body, LANES):
        for j in range(LANES):
            v0, v1, v2, v3 = to_f32(r0[k + j]), to_f32(r1[k + j]), to_f32(r2[k + j]), to_f32(r3[k + j])
            a0[j] = a0[j] + v0 * v0
            a1[j] = a1[j] + v1 * v1
            a2[j] = a2[j] + v2 * v2
            a3[j] = a3[j] + v3 * v3
    w = _norms_finish((r0, r1, r2, r3), body, s)
    return w[0], w[1], w[2], w[3]


@njit(cache=True)
def _add4(acc, p0, p1, p2, p3, w, start, stop):
    """acc[start:stop] += ((p0 w0 + p1 w1) + p2 w2) + p3 w3, element by element."""
    w0, w1, w2, w3 = w
    for k in range(start, stop):
        acc[k] = acc[k] + (((to_f32(p0[k]) * w0 + to_f32(p1[k]) * w1) + to_f32(p2[k]) * w2) + to_f32(p3[k]) * w3)


@njit(cache=True)
def _add4_squares4(acc, p0, p1, p2, p3, w, r0, r1, r2, r3, s):
    """_add4(acc, p.., w) over all elements and _squares4(r.., s), in one pass over memory."""
    s[:] = 0
    body = acc.size - acc.size % LANES
    a0, a1, a2, a3 = s[0], s[1], s[2], s[3]
    w0, w1, w2, w3 = w
    for k in range(0, body, LANES):
        for j in range(LANES):
            t = k + j
            acc[t] = acc[t] + (((to_f32(p0[t]) * w0 + to_f32(p1[t]) * w1) + to_f32(p2[t]) * w2) + to_f32(p3[t]) * w3)
            v0, v1, v2, v3 = to_f32(r0[t]), to_f32(r1[t]), to_f32(r2[t]), to_f32(r3[t])
            a0[j] = a0[j] + v0 * v0
            a1[j] = a1[j] + v1 * v1
            a2[j] = a2[j] + v2 * v2
            a3[j] = a3[j] + v3 * v3
    _add4(acc, p0, p1, p2, p3, w, body, acc.size)
    out = _norms_finish((r0, r1, r2, r3), body, s)
    return out[0], out[1], out[2], out[3]


@njit(cache=True)
def _block(flat, starts, b, d):
    o = starts[4 * b : 4 * b + 4]
    return flat[o[0] : o[0] + d], flat[o[1] : o[1] + d], flat[o[2] : o[2] + d], flat[o[3] : o[3] + d]


@njit(cache=True)
def _unit_sum_rows(flat, offsets, d, acc):
    """acc += x/|x| for the rows of flat starting at offsets (>= 0), in row order."""
    s = np.empty((4, LANES), np.float32)
    starts = offsets[offsets >= 0]
    blocks = starts.size // 4
    zero = np.float32(0)
    if blocks > 0:
        p0, p1, p2, p3 = _block(flat, starts, 0, d)
        w = _squares4(p0, p1, p2, p3, s)
        for b in range(1, blocks):
            r0, r1, r2, r3 = _block(flat, starts, b, d)
            w = _add4_squares4(acc, p0, p1, p2, p3, w, r0, r1, r2, r3, s)
            p0, p1, p2, p3 = r0, r1, r2, r3
        _add4(acc, p0, p1, p2, p3, w, 0, d)
    for start in starts[4 * blocks :]:  # the last rows one at a time, as four copies with weights (w, 0, 0, 0)
        row = flat[start : start + d]
        w = _squares4(row, row, row, row, s)
        _add4(acc, row, row, row, row, (w[0], zero, zero, zero), 0, d)


@njit(parallel=True, cache=True)
def _unit_sums(flat, offsets, d, rows_per_task):
    groups, m = offsets.shape
    tasks = max(1, -(-m // rows_per_task))
    partial = np.zeros((groups, tasks, d), np.float32)
    for job in prange(groups * tasks):
        g, t = job // tasks, job % tasks
        _unit_sum_rows(flat, offsets[g, t * rows_per_task : (t + 1) * rows_per_task], d, partial[g, t])
    if tasks == 1:  # numba's generic sum(axis=1) would cost ~10% of a one-sample call
        return partial[:, 0]
    sums = partial[:, 0].copy()
    for g in prange(groups):
        for t in range(1, tasks):  # task order: the same for any thread count
            sums[g] += partial[g, t]
    return sums


@njit(cache=True)
def _unit_dot(row, u, s):
    """(row / |row|) . u, both sums in LANES lanes; s: (2, LANES) float32 scratch."""
    s[:] = 0
    squares, dots = s[0], s[1]
    body = u.size - u.size % LANES
    for k in range(0, body, LANES):
        for j in range(LANES):
            v = to_f32(row[k + j])
            squares[j] = squares[j] + v * v
            dots[j] = dots[j] + v * u[k + j]
    square, dot = _lane_total(squares), _lane_total(dots)
    for k in range(body, u.size):
        v = to_f32(row[k])
        square = square + v * v
        dot = dot + v * u[k]
    return dot * _inv_norm(square)


@njit(parallel=True, cache=True)
def _unit_dots(flat, offsets, d, u):
    groups, m = offsets.shape
    out = np.empty((groups, m), np.float32)
    for job in prange(groups * m):
        g, i = job // m, job % m
        start = offsets[g, i]
        out[g, i] = np.nan if start < 0 else _unit_dot(flat[start : start + d], u[g], np.empty((2, LANES), np.float32))
    return out


def unit_sums(flat: torch.Tensor, offsets: torch.Tensor, d: int) -> torch.Tensor:
    """Sum of x/|x| over the valid rows of each group: (G, d) float32.

    flat: 1-D fp16/bf16/fp32 storage; offsets: (G, m) int64 row starts in it, -1 for masked rows.
    """
    return torch.from_numpy(_unit_sums(as_numpy(flat), offsets.numpy(), d, ROWS_PER_TASK))


def unit_dots(flat: torch.Tensor, offsets: torch.Tensor, d: int, u: torch.Tensor) -> torch.Tensor:
    """(x/|x|) . u[g] for every row x of group g: (G, m) float32, NaN for masked rows.

    flat, offsets as in `unit_sums`; u: (G, d) float32.
    """
    return torch.from_numpy(_unit_dots(as_numpy(flat), offsets.numpy(), d, u.contiguous().numpy()))
