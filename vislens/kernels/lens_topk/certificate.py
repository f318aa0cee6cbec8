"""The exact CPU lens's certificate: the numba kernels of its steps, and the proof that the
answer is exact (numba.py runs them; screen.py supplies the int8 GEMM).

Ids and values equal the reference's (reference.py: v_ij = RN32(z_ij), z_ij = x_i . w_j
exactly; larger value first, then smaller id), whatever the data. Proof:

Rotation. The screen works on x' = H D x and w' = H D w (D: fixed random signs; H: the
Hadamard transform on blocks of up to 256 dims, scaled by a power of two to be orthogonal), so
that x' . w' = x . w, while a few large channels (as LLaMA-family hidden states have) are spread
over a block instead of setting the int8 scale of the whole row. x' and w' are computed in fp32:
each of the log2(block) <= 8 butterfly stages rounds once per element, so |x'_c - x'| <=
8 2^-24 |x| (likewise for w), and |x . w - x'_c . w'_c| <= 2^-18 |x| |w|, added to E below.

Screen. Per row, x'_i = sx_i qx_i + ex_i with qx_i int8 (sx_i = max|x'_i| / 127); per vocabulary
row, w'_j = sw_j qw_j + ew_j (prepared once). Then exactly
    x'_i . w'_j = sx_i sw_j (qx_i . qw_j) + sx_i (qx_i . ew_j) + ex_i . w'_j,
and by Cauchy-Schwarz the last two terms are at most sx_i |qx_i| |ew_j| + |ex_i| |w_j|, so
    |z_ij - s_ij| <= E_ij = sx_i |qx_i| |ew_j| + (|ex_i| + 2^-18 |x_i|) |w_j|
for s_ij = sx_i sw_j (qx_i . qw_j). qx_i . qw_j is an integer (an int8 GEMM: VNNI); the norms
come once per row and per vocabulary row, in fp64 from the residuals. Which int8 GEMM computes
qx_i . qw_j, and how every call checks that it is exact, is screen.py's business; the codes of x
lie in [-L, L] with L = 127, or 63 on the path that avoids 16-bit saturation (sx_i = max|x'_i| / L).
(oneDNN returns the integer as fp32, off by at most rho_j (screen.rounding); as a nonzero row has
an entry +-L, sx_i sw_j rho_j <= sx_i |qx_i| sw_j rho_j / L, which is added to |ew_j|.) The
scans evaluate s_ij + E_ij in fp32 from terms rounded up (inflated by 2^-20), and inflate the
result by 2^-18 of each part, beyond the few fp32 roundings of the evaluation; fp64 bounds are
inflated by 2^-20 of themselves and 2^-50 of the value they bound (their rounding: d 2^-53).

fp32 intervals. An fp32 dot product of d terms, summed in any order with or without FMA, is
within gamma32_(d+1) sum_t |a_t b_t| <= gamma32_(d+1) |a| |b| of the exact one (Higham, Accuracy
and Stability of Numerical Algorithms, eq. 3.5; gamma_n = n u / (1 - n u), u = 2^-24). Step (3)
reads x_i rounded to fp16 (half the bytes), |x_i - x16_i| = dx_i computed exactly, so
|z_ij - fl(x16_i . w_j)| <= dx_i |w_j| + gamma32_(d+1) (|x_i| + dx_i) |w_j|: an interval
[lo_ij, hi_ij] around z_ij.

Certificate, per row (lemma: if k ids have values >= T, any id with z < pred32(T) has v < T
and cannot be in the top k, whatever the ties, as RN32 is monotone).
(1) Take the k ids with the largest s_ij, and T = the smallest RN32(lo) among them: k ids have
    v >= T. Let m = T - 2^(e-24) (e from frexp(T); 2^-149 at 0), so m <= pred32(T).
(2) Candidates: the ids with s_ij + E_ij >= m. Any other id has z < m: ruled out by the lemma.
(3) fp32 intervals of the candidates. T2 = the k-th largest RN32(lo) among them gives m2 the
    same way; a candidate with hi < max(m, m2) is ruled out by the lemma.
(4) The candidates left (about k) are summed in fp64: products of fp32 values are exact in fp64,
    and a sum of d of them in any order is within gamma64_d sum|p| of z; when every real in that
    interval rounds to one fp32, that is v_ij, otherwise (about 1 pair in 10^4, and any exact
    fp32 midpoint) reference.exact_dot computes it with math.fsum. The top k of these by the
    tie rule is the answer: every id outside them was ruled out in (2) or (3).

Fallback. A row with more than `cap` candidates in (2) (flat logits, where E is wide against
their spread) is screened again with an fp32 GEMM (error at most gamma32_d |x_i| |w_j|, the
same classical-summation bound) and certified the same way with no cap.

Order of work. (1)-(2) scan each row of the screen; (3) runs over the candidate pairs in
vocabulary order, so an unembedding row is read from memory once for all the rows that need it
(half the time of reading it once per pair); (4) runs per row. Measured (bench/lens.py, one
7B layer of 576 rows, one thread): int8 GEMM 0.28 s of ~0.32 s (k = 1) to ~0.40 s (k = 10, flat
logits: ~190 candidates per row), against 1.1 s for the fp32 GEMM + topk.
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np
import torch
from numba import njit, prange

from vislens.kernels._numba import FASTMATH, as_numpy, to_f32
from vislens.kernels.lens_topk.reference import exact_dot

U64 = 2.0**-53
U32 = 2.0**-24
SLACK = 2.0**-20


def rotation(d: int) -> tuple[np.ndarray, int]:
    """The screen's basis change: random signs (fixed seed) and the Hadamard transform on blocks
    of `block` dims (the largest of 256, 64, 16, 4, 1 dividing d: 1/sqrt(block) is a power of two)."""
    block = next(b for b in (256, 64, 16, 4, 1) if d % b == 0)
    return np.random.default_rng(0).choice(np.array([-1.0, 1.0], np.float32), size=d), block


@njit(fastmath=FASTMATH, cache=True)
def _rotate(row, signs, block, out):
    """out = H D row in fp32: signs, a Hadamard butterfly per block (the first two stages as one
    radix-4 step), scaled by 1/sqrt(block), a power of two. Error: at most log2(block) 2^-24 |row|
    (each stage rounds once per element and the transform is orthogonal up to that scale)."""
    for t in range(row.size):
        out[t] = signs[t] * to_f32(row[t])
    if block >= 4:
        for i in range(0, out.size, 4):
            a, b, c, e = out[i], out[i + 1], out[i + 2], out[i + 3]
            out[i], out[i + 1], out[i + 2], out[i + 3] = (
                (a + b) + (c + e),
                (a - b) + (c - e),
                (a + b) - (c + e),
                (a - b) - (c - e),
            )
    h = 4
    while h < block:
        for i in range(0, out.size, 2 * h):
            for t in range(h):
                u, v = out[i + t], out[i + h + t]
                out[i + t], out[i + h + t] = u + v, u - v
        h *= 2
    scale = np.float32(1.0 / math.sqrt(block))
    for t in range(out.size):
        out[t] *= scale


@njit(parallel=True, cache=True)
def _quantize(x, signs, block, out, levels, scale, q2, q1, e2, x2):
    """Per row of x (fp16/bf16 bits or fp32), rotated (x' = H D x in fp32, see `rotation`):
    scale = max|x'| / levels, out = round(x' / scale) (int8 codes in [-levels, levels]), and in
    fp64 |q|, |q|_1, |x' - scale q| and |x|. False if x is not finite."""
    rows, d = x.shape
    finite = np.ones(rows, np.bool_)
    for i in prange(rows):
        rotated = np.empty(d, np.float32)
        _rotate(x[i], signs, block, rotated)
        finite[i], scale[i], q2[i], q1[i], e2[i], x2[i] = _codes(x[i], rotated, out[i], levels)
    return finite.all()


@njit(fastmath=FASTMATH, cache=True)
def _codes(row, rotated, out, levels):
    xsq = 0.0
    for t in range(row.size):
        v = np.float64(to_f32(row[t]))
        xsq += v * v
    top = np.float32(0)
    for t in range(rotated.size):
        top = max(top, abs(rotated[t]))
    if not (xsq < np.inf and top < np.inf):  # NaN fails too
        return False, 0.0, 0.0, 0.0, 0.0, 0.0
    level = np.float32(levels)
    s = top / level
    inverse = np.float32(1) / s if s > 0 else np.float32(0)
    s64 = np.float64(s)
    sq = l1 = esq = 0.0
    for t in range(rotated.size):
        q = min(max(np.rint(rotated[t] * inverse), -level), level)
        out[t] = q
        q64 = np.float64(q)
        e = np.float64(rotated[t]) - s64 * q64
        sq += q64 * q64
        l1 += abs(q64)
        esq += e * e
    return True, s64, math.sqrt(sq), l1, math.sqrt(esq), math.sqrt(xsq)


_SCAN = {"reassoc", "contract", "nnan", "ninf", "nsz"}  # the scans read finite data only
_BLOCK = 128  # vocabulary ids per vectorised scan step
_BIG = 1.7976931348623157e308


@njit(fastmath=FASTMATH, cache=True)
def _dot32(x, w):
    """fp32 dot product of two stored rows (fp16/bf16 bits or fp32), vectorised in any order."""
    acc = np.float32(0)
    for t in range(x.size):
        acc += to_f32(x[t]) * to_f32(w[t])
    return acc


@njit(cache=True)
def _interval(x, w, x_norm, w_norm, rounding):
    """[lo, hi] around x_true . w (exact) from `_dot32(x, w)`, where x (fp32, or fp16 bits) is
    within `rounding` of x_true (|x_true| = x_norm): see "fp32 intervals" above."""
    acc = np.float64(_dot32(x, w))
    n = x.size + 1
    gamma = n * U32 / (1.0 - n * U32)
    delta = (gamma * (x_norm + rounding) + rounding) * w_norm * (1.0 + SLACK) + abs(acc) * 2.0**-50
    return acc - delta, acc + delta


@njit(fastmath=FASTMATH, cache=True)
def _dot64(x, w):
    """fp64 sums of x_t w_t and |x_t w_t|, vectorised in any order (each product is exact)."""
    acc = 0.0
    mag = 0.0
    for t in range(x.size):
        prod = np.float64(x[t]) * np.float64(to_f32(w[t]))
        acc += prod
        mag += abs(prod)
    return acc, mag


@njit(cache=True)
def _gap(f, below):
    """For fp32 f, the smaller of the gaps to its two neighbours (below=False), or a number at
    least the gap to the neighbour below (below=True). With |f| = m 2^e (frexp), the gaps are
    2^(e-24), except 2^(e-25) towards zero from a power of two, and 2^-149 among subnormals."""
    if f == 0:
        return 2.0**-149
    mantissa, e = math.frexp(np.float64(f))
    power_of_two = abs(mantissa) == 0.5
    return math.ldexp(1.0, max(e - (25 if power_of_two and not below else 24), -149))


@njit(cache=True)
def _exact(x, w):
    """(RN32 of x . w, whether that is certain) from an fp64 sum: see (4) above."""
    acc, mag = _dot64(x, w)
    d = x.size
    gamma = d * U64 / (1.0 - d * U64)
    f = np.float32(acc)
    slack = (abs(acc - np.float64(f)) + gamma * mag * (1.0 + SLACK)) * (1.0 + 2.0**-50)
    return f, slack < _gap(f, False) / 2


@njit(cache=True)
def _cut(lows, k):
    """m <= pred32(T), T the k-th largest RN32(low): every real below m rounds below T."""
    rounded = np.empty(lows.size)
    for c in range(lows.size):
        rounded[c] = np.float32(lows[c])  # RN32 is monotone: RN32(lo) <= RN32(z) = v
    rounded.sort()
    threshold = np.float32(rounded[lows.size - k])
    return np.float64(threshold) - _gap(threshold, True)


@njit(fastmath=_SCAN, cache=True)
def _block_above(row, sw, threshold):
    """How many t have row[t] * sw[t] > threshold (slices of one block: loops from 0 vectorise)."""
    above = 0
    for t in range(row.size):
        above += row[t] * sw[t] > threshold
    return above


@njit(cache=True)
def _top_screen(row, sw, k):
    """The k ids with the largest screen values row[j] * sw[j] (any k ids would be correct)."""
    top = np.full(k, -_BIG)
    top_ids = np.zeros(k, np.int64)
    for j0 in range(0, row.size, _BLOCK):
        j1 = min(j0 + _BLOCK, row.size)
        if _block_above(row[j0:j1], sw[j0:j1], top[k - 1]) == 0:
            continue
        for j in range(j0, j1):
            t = row[j] * sw[j]
            if t > top[k - 1]:
                pos = k - 1
                while pos > 0 and top[pos - 1] < t:
                    top[pos] = top[pos - 1]
                    top_ids[pos] = top_ids[pos - 1]
                    pos -= 1
                top[pos] = t
                top_ids[pos] = j
    return top_ids


@njit(fastmath=_SCAN, cache=True)
def _upper(screen, si, swj, ai, pj, bi, qj):
    """s_ij + E_ij in fp32 from fp32 terms (a, p, b, q rounded up), inflated past the rounding
    of its own evaluation in any order (a few fp32 roundings: under 2^-21 of each part)."""
    s = np.float32(screen) * (si * swj)
    return s + (ai * pj + bi * qj) * np.float32(1 + 2.0**-18) + abs(s) * np.float32(2.0**-18)


@njit(fastmath=_SCAN, cache=True)
def _block_hits(row, si, sw, ai, p, bi, q, m, hit):
    """hit[t] = (s + E >= m) over a block's ids (slices), and how many."""
    hits = 0
    for t in range(row.size):
        hit[t] = _upper(row[t], si, sw[t], ai, p[t], bi, q[t]) >= m
        hits += hit[t]
    return hits


@njit(cache=True)
def _candidates_row(i, x, w, screen, sx, sw, a, p, b, q, xn, wn, k, ids, counts, cuts):
    """Steps (1) and (2) for row i: candidate ids (up to the capacity of `ids`), their count, m.
    The scans run in fp32 (the bound terms sx..q are fp32 here, rounded up where they bound)."""
    xi, row = x[i], screen[i]
    top = _top_screen(row, sw, k)
    lows = np.empty(k)
    for r in range(k):
        lows[r] = _interval(xi, w[top[r]], xn[i], wn[top[r]], 0.0)[0]
    m = _cut(lows, k)
    cuts[i] = m
    m = np.float32(m - abs(m) * 2.0**-20 - 2.0**-140)  # an fp32 at most m
    n = 0
    si, ai, bi, cap = sx[i], a[i], b[i], ids.shape[1]
    hit = np.empty(_BLOCK, np.bool_)
    for j0 in range(0, row.size, _BLOCK):
        j1 = min(j0 + _BLOCK, row.size)
        if _block_hits(row[j0:j1], si, sw[j0:j1], ai, p[j0:j1], bi, q[j0:j1], m, hit) == 0:
            continue
        for t in range(j1 - j0):
            if hit[t]:
                if n < cap:
                    ids[i, n] = j0 + t
                n += 1
    counts[i] = n


@njit(parallel=True, cache=True)
def _candidates(x, w, screen, sx, sw, a, p, b, q, xn, wn, k, ids, counts, cuts):
    for i in prange(screen.shape[0]):
        _candidates_row(i, x, w, screen, sx, sw, a, p, b, q, xn, wn, k, ids, counts, cuts)


@njit(cache=True)
def _by_vocabulary(ids, counts, vocab):
    """The (row, slot) of every candidate of the rows within capacity, in vocabulary order."""
    cap = ids.shape[1]
    start = np.zeros(vocab + 1, np.int64)
    for i in range(ids.shape[0]):
        if counts[i] <= cap:
            for c in range(counts[i]):
                start[ids[i, c] + 1] += 1
    for j in range(vocab):
        start[j + 1] += start[j]
    rows, slots = np.empty(start[vocab], np.int64), np.empty(start[vocab], np.int64)
    for i in range(ids.shape[0]):
        if counts[i] <= cap:
            for c in range(counts[i]):
                j = ids[i, c]
                rows[start[j]], slots[start[j]] = i, c
                start[j] += 1
    return rows, slots


@njit(parallel=True, cache=True)
def _intervals(x, xn, dx, w, q, ids, rows, slots, chunks, lo, hi):
    """Step (3)'s fp32 intervals for the pairs (rows, slots), taken in their (vocabulary) order;
    x: the rows as fp16 bits (|x_i - x16_i| <= dx_i: half the bytes to read per pair) or fp32."""
    n = rows.size
    for c in prange(chunks):
        for t in range(c * n // chunks, (c + 1) * n // chunks):
            i, s = rows[t], slots[t]
            j = ids[i, s]
            lo[i, s], hi[i, s] = _interval(x[i], w[j], xn[i], q[j], dx[i])


def _half_rows(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """x as fp16 bits and |x_i - fp16(x_i)| per row (fp64, inflated); x itself (fp32) and 0 where
    fp16 would overflow."""
    half = x.half()
    if bool(torch.isinf(half).any()):
        return x.numpy(), np.zeros(x.shape[0])
    bits = as_numpy(half)
    return bits, _distance(x.numpy(), bits) * (1 + SLACK)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _distance(x, y):
    """|x_i - y_i| per row in fp64 (y: stored rows)."""
    out = np.empty(x.shape[0])
    for i in prange(x.shape[0]):
        total = 0.0
        for t in range(x.shape[1]):
            e = np.float64(x[i, t]) - np.float64(to_f32(y[i, t]))
            total += e * e
        out[i] = math.sqrt(total)
    return out


@njit(cache=True)
def _finish_row(i, x, w, k, ids, counts, cuts, lo, hi, values, sure, kept):
    """Steps (3)-(4) for row i: drop candidates below the cut, sum the rest exactly (compacted)."""
    n = counts[i]
    if n > ids.shape[1]:
        return
    m = max(cuts[i], _cut(lo[i, :n], k))  # n >= k: the k ids that set m are candidates
    left = 0
    for c in range(n):
        if hi[i, c] >= m:
            j = ids[i, c]
            ids[i, left] = j
            values[i, left], sure[i, left] = _exact(x[i], w[j])
            left += 1
    kept[i] = left


@njit(parallel=True, cache=True)
def _finish(x, w, k, ids, counts, cuts, lo, hi, values, sure, kept):
    for i in prange(ids.shape[0]):
        _finish_row(i, x, w, k, ids, counts, cuts, lo, hi, values, sure, kept)


def _certified(
    x: torch.Tensor, prep: Any, screen: torch.Tensor, bounds: tuple, xn: np.ndarray, k: int, cap: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Steps (1)-(4) for rows x (prep: numba.Prepared): (ids, exact values, how many per row) of the ids left, candidates
    per row (more than cap: not certified here), and how many pairs math.fsum summed."""
    rows = x.shape[0]
    ids = np.empty((rows, cap), np.int64)
    counts, cuts = np.zeros(rows, np.int64), np.zeros(rows)
    w, xs = as_numpy(prep.weight), x.numpy()
    sx, sw, a, p, b, q = bounds
    up = 1 + 2.0**-20  # rounding to fp32 can lose 2^-24: terms that bound stay bounds
    scan = (sx.astype(np.float32), sw.astype(np.float32), *((t * up).astype(np.float32) for t in (a, p, b, q)))
    _candidates(xs, w, screen.numpy(), *scan, xn, prep.q, k, ids, counts, cuts)
    pair_rows, pair_slots = _by_vocabulary(ids, counts, w.shape[0])
    lo, hi = np.empty((rows, cap)), np.empty((rows, cap))
    x16, dx = _half_rows(x)
    _intervals(x16, xn, dx, w, prep.q, ids, pair_rows, pair_slots, 8 * numba.get_num_threads(), lo, hi)
    values, sure, kept = np.empty((rows, cap), np.float32), np.empty((rows, cap), np.bool_), np.zeros(rows, np.int64)
    _finish(xs, w, k, ids, counts, cuts, lo, hi, values, sure, kept)
    unsure = _unsure(sure, kept)
    for i, c in unsure:
        values[i, c] = exact_dot(xs[i], _widen(w[ids[i, c]]))
    return ids, values, kept, counts, len(unsure)


@njit(cache=True)
def _unsure(sure, kept):
    """(row, slot) of the kept values whose rounding was not certain."""
    out = []
    for i in range(kept.size):
        for c in range(kept[i]):
            if not sure[i, c]:
                out.append((i, c))
    return out


def _widen(row: np.ndarray) -> np.ndarray:
    """A row of as_numpy storage as its float values (fp16 bits, bf16 bits, or fp32)."""
    if row.dtype == np.uint16:
        return row.view(np.float16)
    if row.dtype == np.int16:  # bf16: the top half of an fp32
        return (row.astype(np.int32) << 16).view(np.float32)
    return row


@njit(parallel=True, cache=True)
def _select(ids, values, kept, k, out_values, out_ids):
    """Top k of each row's kept (id, exact value) pairs by the tie rule (rows with fewer than k,
    the ones over capacity, are left to the fallback)."""
    for i in prange(ids.shape[0]):
        if kept[i] < k:
            continue
        taken = np.zeros(kept[i], np.bool_)
        for r in range(k):
            best = -1
            for c in range(kept[i]):
                if not taken[c] and (
                    best < 0
                    or values[i, c] > values[i, best]
                    or (values[i, c] == values[i, best] and ids[i, c] < ids[i, best])
                ):
                    best = c
            taken[best] = True
            out_values[i, r], out_ids[i, r] = values[i, best], ids[i, best]
