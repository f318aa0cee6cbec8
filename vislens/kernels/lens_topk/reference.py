"""lens_topk written literally: the final norm, every logit, correctly rounded, then a stable sort.

This module defines the answer every backend is tested against.

Logits. The logit of row i and vocabulary id j is the exact real dot product
z_ij = sum_t x_it w_jt of the normed fp32 row x_i = norm(hidden_i) (`apply_norm`: on the CPU in
float64, in numpy's fixed summation order, rounded once to fp32, so the same bits on every CPU;
on a GPU in fp32 torch arithmetic) and the unembedding row w_j widened exactly to fp32, rounded once to the nearest fp32
(ties to even): v_ij = RN32(z_ij). An fp32 GEMM rounds after every addition, in an order that
depends on its blocking, so two GEMMs (or a GEMM and a re-scoring of a few candidates) can
disagree in the last bit; the correctly rounded value is the one fp32 answer that any
implementation can reproduce exactly, so it is the one the ids are defined by.

Tie rule. Ids are ranked by value, larger first; equal values (including -0.0 == +0.0) by id,
smaller first. `rank` applies it with a stable descending sort.

Computing v_ij. fp32 x fp32 products are exact in fp64, and any fp64 summation order of d of
them errs by at most gamma_d * sum_t |p_t| (gamma_d = d u / (1 - d u), u = 2^-53; Higham,
Accuracy and Stability of Numerical Algorithms, eq. 4.4). When that interval around the fp64
sum rounds to a single fp32 (`certain`), that fp32 is v_ij; otherwise (about 1e-4 of the pairs,
and every exact fp32 midpoint) `exact_dot` computes it with math.fsum.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from vislens.errors import DataError
from vislens.kernels.lens_topk.spec import LensUnembedding, as_norm

_U64 = 2.0**-53
_SLACK = 2.0**-20  # relative inflation of every fp64 error bound: covers the bound's own rounding


def apply_norm(x: torch.Tensor, norm: Any | None) -> torch.Tensor:
    """The decoder's final norm on float32 rows x (rows, hidden), as vislens.analyze computes it.

    norm: None (rows used as they are) or an object with kind ("rms": x / rms(x) * w;
    "rms_offset": x / rms(x) * (1 + w), Gemma; "layer": LayerNorm with optional bias), eps,
    weight (hidden,) and bias (hidden,) or None, as float32 tensors on x's device.

    On the CPU the norm is computed in float64 (numpy: its sums run in one fixed order on every
    CPU, where torch's vectorised reductions follow the CPU's vector width) and rounded once to
    float32: the lens's answer does not depend on the CPU. On a GPU, in fp32 torch arithmetic.
    """
    if norm is None:
        return x
    if x.device.type == "cpu":
        return _apply_norm_float64(x, norm)
    if norm.kind in ("rms", "rms_offset"):
        scale = norm.weight + 1.0 if norm.kind == "rms_offset" else norm.weight
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * scale
    if norm.kind == "layer":
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)
    raise DataError(f"unknown norm kind {norm.kind!r}; expected 'rms', 'rms_offset' or 'layer'")


def _apply_norm_float64(x: torch.Tensor, norm: Any) -> torch.Tensor:
    """`apply_norm` on the CPU: float64 throughout, one rounding to float32 at the end."""
    rows = x.detach().numpy().astype(np.float64)
    weight = norm.weight.detach().cpu().numpy().astype(np.float64)
    if norm.kind in ("rms", "rms_offset"):
        scale = weight + 1.0 if norm.kind == "rms_offset" else weight
        inverse = 1.0 / np.sqrt(np.mean(rows * rows, axis=-1, keepdims=True) + norm.eps)
        return torch.from_numpy((rows * inverse * scale).astype(np.float32))
    if norm.kind == "layer":
        centred = rows - np.mean(rows, axis=-1, keepdims=True)
        inverse = 1.0 / np.sqrt(np.mean(centred * centred, axis=-1, keepdims=True) + norm.eps)
        out = centred * inverse * weight
        if norm.bias is not None:
            out = out + norm.bias.detach().cpu().numpy().astype(np.float64)
        return torch.from_numpy(out.astype(np.float32))
    raise DataError(f"unknown norm kind {norm.kind!r}; expected 'rms', 'rms_offset' or 'layer'")


def exact_dot(x: np.ndarray, w: np.ndarray) -> np.float32:
    """RN32 of the exact dot product of two rows of fp16/bf16-widened/fp32 values (any length).

    math.fsum gives r = RN64(z). RN32(r) == RN32(z) unless r is itself an fp32 midpoint (an fp64
    number strictly between z and r cannot exist, so no other fp32 rounding boundary can separate
    them); in that case the exact sign of z - r decides.
    """
    p = x.astype(np.float64) * w.astype(np.float64)  # exact: 24-bit x 24-bit significands
    r = math.fsum(p)
    f = np.float32(r)  # ties to even
    if float(f) != r and math.isfinite(f):
        other = np.nextafter(f, np.float32(math.copysign(math.inf, r - float(f))))
        if (float(f) + float(other)) / 2 == r:  # exact in fp64
            rest = math.fsum(np.append(p, -r))  # the sign of z - r, exactly
            if rest != 0:
                f = max(f, other) if rest > 0 else min(f, other)
    return np.float32(f)


def certain(acc: torch.Tensor, mag: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(RN32(acc), whether every real within gamma_d * mag of acc rounds to it), elementwise.

    acc, mag: fp64 sums of d exact products and of their absolute values, in any order. The
    smaller gap between an fp32 f and its two neighbours is 2^(e - 24) (e from frexp:
    |f| = m 2^e, 1/2 <= m < 1), 2^(e - 25) at a power of two, and 2^-149 among subnormals.
    """
    gamma = d * _U64 / (1 - d * _U64)
    delta = gamma * mag * (1 + _SLACK)
    f = acc.float()
    mantissa, exponent = torch.frexp(f)
    exponent = exponent.double() - torch.where(mantissa.abs() == 0.5, 25.0, 24.0)
    gap = torch.where(f == 0, 2.0**-149, torch.exp2(torch.clamp(exponent, min=-149)))
    ok = (torch.abs(acc - f.double()) + delta) * (1 + 2.0**-50) < gap / 2
    return f, ok & torch.isfinite(f)


def exact_logits(x: torch.Tensor, unembedding: torch.Tensor, *, vocab_block: int = 4096) -> torch.Tensor:
    """v = RN32(x @ w.T) for every pair, exactly: x (rows, d) float32, unembedding (vocab, d)
    float16/bfloat16/float32 -> (rows, vocab) float32. Vocabulary in blocks (bounded memory)."""
    x64 = x.double().cpu()
    out = torch.empty(x.shape[0], unembedding.shape[0], dtype=torch.float32)
    for v0 in range(0, unembedding.shape[0], vocab_block):
        w64 = unembedding[v0 : v0 + vocab_block].double().cpu()
        acc, mag = x64 @ w64.T, x64.abs() @ w64.abs().T
        values, ok = certain(acc, mag, x.shape[1])
        for i, j in (~ok).nonzero().tolist():
            values[i, j] = float(exact_dot(x64[i].numpy(), w64[j].numpy()))
        out[:, v0 : v0 + w64.shape[0]] = values
    return out


def rank(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k of each row by the tie rule: larger value first, then smaller id. (rows, n) ->
    (rows, k) values and int64 positions."""
    values = torch.where(values == 0, torch.zeros_like(values), values)  # -0.0 ties with +0.0
    ordered, ids = torch.sort(values, dim=1, descending=True, stable=True)
    return ordered[:, :k], ids[:, :k]


def lens_topk(
    hidden: torch.Tensor, unembedding: torch.Tensor | LensUnembedding, k: int, norm: Any | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference top-k logits of hidden (rows, d): (rows, k) float32 values (correctly rounded)
    and int64 ids; norm as for vislens.kernels.lens_topk."""
    weight = unembedding.weight if isinstance(unembedding, LensUnembedding) else unembedding
    x = apply_norm(hidden.float().cpu(), as_norm(norm, hidden.shape[-1], torch.device("cpu")))
    return rank(exact_logits(x, weight), k)
