"""lens_topk on the CPU, exact: an int8 screen with a certified error bound, then exact
re-scoring of only the candidates the bound cannot rule out.

Ids and values equal the reference's (reference.py: v_ij = RN32(z_ij), z_ij = x_i . w_j
exactly; larger value first, then smaller id), whatever the data and whatever the CPU. The proof
is in certificate.py, beside the kernels of its steps; which int8 GEMM screens, and how each call
checks it, is screen.py's. This module prepares the unembedding once, runs the steps block by
block, and checks every row's answer before returning it:

Checks. Whatever the path, every row's answer is checked before it is returned: k ids in
[0, vocab), ranked by the tie rule, each value equal to the exact re-scoring of its id, and the
certificate met (at least k ids kept in step (3): with a correct screen the k ids that set m
always are). A row that fails (only a faulty screen can make it fail) is redone on the fp32
screen, and a block whose sentinel rows come back wrong (screen.py) is redone whole; both warn
once, naming the CPU and the path. A row that fails on the fp32 screen too raises
KernelCheckError.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from numba import njit, prange

from vislens.errors import BackendUnavailableError, KernelCheckError
from vislens.kernels._numba import as_numpy
from vislens.kernels.lens_topk import screen
from vislens.kernels.lens_topk.certificate import (
    U32,
    _certified,
    _exact,
    _quantize,
    _select,
    _widen,
    rotation,
)
from vislens.kernels.lens_topk.reference import exact_dot

CAP = 2048  # candidates a row may keep before it falls back to the fp32 screen
ROW_BLOCK = 1024  # rows per int8 GEMM: bounds the (rows, vocab) screen in memory
_VOCAB_BLOCK = 4096
_FALLBACK_BLOCK = 64  # rows screened again at a time (their candidates may span the vocabulary)


@dataclass(frozen=True)
class Prepared:
    """The unembedding's int8 form and row norms, built once by `prepare`."""

    weight: torch.Tensor  # (V, d) as given, contiguous: exact re-scoring reads it
    path: screen.Path  # the int8 GEMM that screens (or "fp32": none)
    packed: torch.Tensor | None  # qw in the form the path's GEMM reads
    sw: np.ndarray  # (V,) fp64 scales
    p: np.ndarray  # (V,) fp64 |ew_j| (+ the GEMM's rounding term)
    q: np.ndarray  # (V,) fp64 |w_j|
    sentinels: screen.Sentinels | None  # checked in every call of the path's GEMM
    probes: dict[str, str]  # path name -> "passed" or why it was not used

    @property
    def gemm(self) -> str:
        """The name of the screen's path (screen.PATHS)."""
        return self.path.name


@dataclass(frozen=True)
class Stats:
    """How the certificate went: candidates per row, rows screened again, pairs summed exactly."""

    candidates: np.ndarray  # (rows,) int64: ids re-scored exactly per row
    fallback: np.ndarray  # (rows,) bool: rows screened again in fp32
    exact_sums: int  # pairs whose fp64 sum did not round safely (math.fsum)
    redone: int = 0  # rows redone on the fp32 screen because their first answer failed a check


def prepare(weight: torch.Tensor, gemm: str = "auto") -> Prepared:
    """int8 rows qw'_j = round(w'_j / sw_j) of the rotated w'_j = H D w_j, sw_j = max|w'_j| / 127,
    the norms of the bound, and the screen's GEMM path (screen.py): "auto" takes the first of
    screen.AUTO_ORDER whose probe passes on this CPU, else "fp32"; a path named explicitly whose
    probe fails raises BackendUnavailableError saying why."""
    if gemm != "auto" and gemm not in screen.PATHS:
        raise ValueError(f"gemm must be 'auto' or one of {screen.PATHS}, got {gemm!r}")
    weight = weight.detach().contiguous()
    vocab, d = weight.shape
    if 255 * 127 * d >= 2**31:
        raise ValueError(f"hidden size {d} is too large for exact int32 accumulation (at most 66000)")
    signs, block = rotation(d)
    qw = torch.empty(vocab, d, dtype=torch.int8)
    sw, q2, l1, ew, wn = (np.empty(vocab) for _ in range(5))
    if not _quantize(as_numpy(weight), signs, block, qw.numpy(), 127, sw, q2, l1, ew, wn):
        raise ValueError("the unembedding holds NaN or infinite values")
    probes: dict[str, str] = {}
    for name in screen.AUTO_ORDER if gemm == "auto" else (gemm,):
        path = screen.PATH[name]
        if name == "fp32":
            return Prepared(weight, path, None, sw, ew, wn, None, {"fp32": "passed"})
        why = screen.worst_case_probe(path, d)
        if why is None:
            packed = screen.pack(path, qw)
            sentinels = screen.sentinels(path, qw, l1)
            try:
                screen.check(screen.gemm(path, sentinels.codes, packed, vocab), sentinels, path)
            except screen.ScreenFault as fault:
                why = f"it returned wrong products for this unembedding: {fault}"
        if why is None:
            probes[name] = "passed"
            extra = sw * screen.rounding(path, l1) / path.levels  # see "Screen" above
            return Prepared(weight, path, packed, sw, ew + extra, wn, sentinels, probes)
        probes[name] = why
        if gemm != "auto":
            raise BackendUnavailableError(
                f"CPU feature missing: the lens screen's int8 GEMM path {name!r} needs {path.needs}; "
                f"on this CPU, {screen.describe_cpu()}, {why}; use gemm='auto'"
            )
    return Prepared(weight, screen.PATH["fp32"], None, sw, ew, wn, None, {**probes, "fp32": "passed"})


def _screen(x: torch.Tensor, prep: Prepared) -> tuple[torch.Tensor, tuple, np.ndarray]:
    """The int8 screen of rows x (R, d) fp32: qx' . qw'_j (fp32 or int32), its bound terms
    (sx, sw, sx |qx'|, |ew'|, |ex'| + 2^-18 |x|, |w|) and |x|. The path's sentinel rows ride in
    the same GEMM; ScreenFault if their products are wrong."""
    rows = x.shape[0]
    path = prep.path
    sx, q2, l1, ex, xn = (np.empty(rows) for _ in range(5))
    codes = torch.empty(x.shape, dtype=torch.int8)
    signs, block = rotation(x.shape[1])
    if not _quantize(x.numpy(), signs, block, codes.numpy(), path.levels, sx, q2, l1, ex, xn):
        raise ValueError("the normed hidden rows hold NaN or infinite values")
    both = torch.cat([screen.encode(path, codes), prep.sentinels.codes])
    out = screen.gemm(path, both, prep.packed, prep.sw.size)
    screen.check(out[rows:], prep.sentinels, path)
    return out[:rows], (sx, prep.sw, sx * q2, prep.p, ex + 2.0**-18 * xn, prep.q), xn


def _fp32_screen(x: torch.Tensor, prep: Prepared) -> tuple[torch.Tensor, tuple, np.ndarray]:
    """fp32 GEMM logits of rows x, with the bound terms of their rounding (gamma32_d |x_i| |w_j|)."""
    vocab, d = prep.weight.shape
    logits = torch.empty(x.shape[0], vocab)
    for v0 in range(0, vocab, _VOCAB_BLOCK):  # widened a slice at a time: no fp32 copy of W is kept
        logits[:, v0 : v0 + _VOCAB_BLOCK] = x @ prep.weight[v0 : v0 + _VOCAB_BLOCK].float().T
    xn = x.double().norm(dim=1).numpy()
    gamma = d * U32 / (1 - d * U32)
    rows = x.shape[0]
    return logits, (np.ones(rows), np.ones(vocab), np.zeros(rows), np.zeros(vocab), gamma * xn, prep.q), xn


@njit(parallel=True, cache=True)
def _check_rows(x, w, ids, values, bad, unsure):
    """Per row: ids in [0, vocab), ranked by the tie rule, values equal to the exact re-scoring
    (where its fp64 sum rounds safely; `unsure` marks the others for math.fsum)."""
    vocab = w.shape[0]
    for i in prange(ids.shape[0]):
        for r in range(ids.shape[1]):
            j = ids[i, r]
            if j < 0 or j >= vocab:
                bad[i] = True
                break
            if r > 0 and (values[i, r] > values[i, r - 1] or (values[i, r] == values[i, r - 1] and j <= ids[i, r - 1])):
                bad[i] = True
                break
            v, sure = _exact(x[i], w[j])
            if not sure:
                unsure[i, r] = True
            elif v != values[i, r]:
                bad[i] = True
                break


def _failing(x: torch.Tensor, prep: Prepared, ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(rows,) bool: which rows' answers fail `_check_rows` (the unsure values checked with fsum)."""
    xs, w = x.numpy(), as_numpy(prep.weight)
    bad, unsure = np.zeros(ids.shape[0], np.bool_), np.zeros(ids.shape, np.bool_)
    _check_rows(xs, w, ids, values, bad, unsure)
    for i, r in zip(*np.nonzero(unsure & ~bad[:, None]), strict=True):
        if exact_dot(xs[i], _widen(w[ids[i, r]])) != values[i, r]:
            bad[i] = True
    return bad


_FAULTY: set[str] = set()  # int8 paths whose sentinel rows came back wrong in this process
_WARNED: set[str] = set()


def _warn(prep: Prepared, what: str) -> None:
    key = f"{prep.gemm}: {what}"
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(
            f"vislens lens_topk on {screen.describe_cpu()}, int8 GEMM path {prep.gemm!r}: {what}; "
            "the rows were redone on the fp32 screen, so the results are exact",
            RuntimeWarning,
            stacklevel=3,
        )


@dataclass
class _Answer:
    """The answer being built for one block of rows."""

    values: np.ndarray  # (rows, k) float32
    ids: np.ndarray  # (rows, k) int64, -1 until a row is answered
    counts: np.ndarray  # (rows,) candidates re-scored per row (its last pass)
    fallback: np.ndarray  # (rows,) screened in fp32
    exact_sums: int = 0
    redone: int = 0


def _certify(
    answer: _Answer, rows: np.ndarray, x: torch.Tensor, prep: Prepared, k: int, cap: int, fp32: bool
) -> np.ndarray:
    """Screen rows `rows` of x (int8, or fp32) and certify them with at most `cap` candidates;
    write the answers of the rows within capacity that pass their checks; return the other rows."""
    xs = x[torch.from_numpy(rows)] if rows.size < x.shape[0] else x
    logits, bounds, xn = _fp32_screen(xs, prep) if fp32 else _screen(xs, prep)
    cand, vals, kept, n, unsure = _certified(xs, prep, logits, bounds, xn, k, cap)
    del logits
    values, ids = np.zeros((rows.size, k), np.float32), np.full((rows.size, k), -1, np.int64)
    _select(cand, vals, kept, k, values, ids)
    failed = (n <= cap) & _failing(xs, prep, ids, values)
    if failed.any():
        if fp32:
            raise KernelCheckError(
                f"lens_topk could not certify {int(failed.sum())} rows even on the fp32 screen on "
                f"{screen.describe_cpu()}; compute the lens with backend='torch' and report this"
            )
        _warn(prep, f"{int(failed.sum())} rows failed their certificate (a wrong screen)")
        answer.redone += int(failed.sum())
    done = (n <= cap) & ~failed
    answer.values[rows[done]], answer.ids[rows[done]] = values[done], ids[done]
    answer.counts[rows], answer.exact_sums = n, answer.exact_sums + unsure
    answer.fallback[rows] |= fp32
    return rows[~done]


def topk(x: torch.Tensor, prep: Prepared, k: int, *, cap: int = CAP) -> tuple[torch.Tensor, torch.Tensor, Stats]:
    """x: (rows, d) float32 normed rows -> (rows, k) exact float32 values, int64 ids, and Stats.

    Each block of rows is screened with the prepared int8 path (unless it is "fp32" or found
    faulty in this process), certified with at most `cap` candidates per row; the rows left
    (flat logits, or a failed check) are screened in fp32 with the same cap, and any still left
    (exact ties across the vocabulary) in fp32 with no cap, a few rows at a time.

    Raises KernelCheckError if a row cannot be certified even on the fp32 screen."""
    rows, cap = x.shape[0], max(cap, k)
    vocab = prep.weight.shape[0]
    answer = _Answer(
        np.zeros((rows, k), np.float32),
        np.full((rows, k), -1, np.int64),
        np.zeros(rows, np.int64),
        np.zeros(rows, bool),
    )
    for r0 in range(0, rows, ROW_BLOCK):
        xb = x[r0 : r0 + ROW_BLOCK].contiguous()
        block = _Answer(
            *(a[r0 : r0 + xb.shape[0]] for a in (answer.values, answer.ids, answer.counts, answer.fallback))
        )
        left = np.arange(xb.shape[0])
        if prep.gemm != "fp32" and prep.gemm not in _FAULTY:
            try:
                left = _certify(block, left, xb, prep, k, cap, fp32=False)
            except screen.ScreenFault as fault:
                _FAULTY.add(prep.gemm)
                _warn(prep, f"{fault}, so the path is off for the rest of this process")
                block.redone += xb.shape[0]
        if left.size:
            left = _certify(block, left, xb, prep, k, cap, fp32=True)
        for w0 in range(0, left.size, _FALLBACK_BLOCK):  # every logit may be a candidate here
            _certify(block, left[w0 : w0 + _FALLBACK_BLOCK], xb, prep, k, vocab, fp32=True)
        answer.exact_sums += block.exact_sums
        answer.redone += block.redone
    stats = Stats(answer.counts, answer.fallback, answer.exact_sums, answer.redone)
    return torch.from_numpy(answer.values), torch.from_numpy(answer.ids), stats
