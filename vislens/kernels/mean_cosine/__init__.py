"""Mean cosine similarity between two sets of rows (docs/methods.md, analysis 2), in one pass.

Uses the exact identity mean_ij cos(a_i, b_j) = mean_i(a_i/|a_i|) . mean_j(b_j/|b_j|): the
kernels only sum unit rows (fp32 accumulation), never forming the m x n matrix.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from vislens.kernels._backend import load, resolve
from vislens.kernels.mean_cosine import eager

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def mean_cosine(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    a_mask: torch.Tensor | None = None,
    b_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean of cos(a_i, b_j) over all pairs of valid rows.

    Parameters
    ----------
    a, b : (..., m, d) and (..., n, d) float16, bfloat16 or float32; leading dims broadcast,
        e.g. (sample, layer, token, hidden) image and text hidden states.
    a_mask, b_mask : optional (..., m) and (..., n) bool; False rows (padding) are left out.
    backend : "auto" | "triton" | "numba" | "torch".

    Returns
    -------
    (...) float32. A zero row has cosine 0 with everything and still counts; NaN when a side
    has no valid row.
    """
    _check(a, b, a_mask, b_mask)
    name = resolve(backend, a, b, *_present(a_mask, b_mask))
    same = b is a and b_mask is a_mask
    a, b = a.detach(), b.detach()
    if same:  # e.g. image-image: one pass
        ua = ub = _unit_mean(a, a_mask, name)
    elif name != "torch" and _same_rows(a, b):  # e.g. image-text of one array: one kernel call
        ua, ub = _unit_mean_pair(a, a_mask, b_mask, name)
    else:
        ua, ub = _unit_mean(a, a_mask, name), _unit_mean(b, b_mask, name)
    if ua.device.type == "cpu":
        return torch.from_numpy(np.asarray((ua.numpy() * ub.numpy()).sum(-1)))
    return (ua * ub).sum(-1)


def cosine_profile(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    a_mask: torch.Tensor | None = None,
    b_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """For each row of a, its mean cosine to the valid rows of b, without the m x n matrix.

    Takes the same arguments as `mean_cosine`; returns (..., m) float32, NaN for masked rows of a
    (and everywhere when b has no valid row).
    """
    _check(a, b, a_mask, b_mask)
    name = resolve(backend, a, b, *_present(a_mask, b_mask))
    a, b = a.detach(), b.detach()
    u = _unit_mean(b, b_mask, name)
    *lead, m, d = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + a.shape[-2:]
    a = a.expand(*lead, m, d)
    a_mask = None if a_mask is None else a_mask.expand(*lead, m)
    u = u.expand(*lead, d)
    if name == "torch":
        return eager.unit_dots(a, a_mask, u)
    flat, offsets = _rows(a, a_mask)
    dots = load(__name__, name).unit_dots(flat, offsets, d, u.reshape(-1, d).contiguous())
    return dots.reshape(*lead, m)


def _unit_mean(x: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor:
    """Mean of x_i/|x_i| over the valid rows: (..., m, d) -> (..., d) float32."""
    if name == "torch":
        return eager.unit_mean(x, mask)
    *lead, m, d = x.shape
    flat, offsets = _rows(x, mask)
    return _means(load(__name__, name).unit_sums(flat, offsets, d), offsets).reshape(*lead, d)


def _same_rows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b are the same rows of one storage (only their masks differ)."""
    return a.shape == b.shape and a.stride() == b.stride() and a.data_ptr() == b.data_ptr() and a.dtype == b.dtype


def _unit_mean_pair(
    x: torch.Tensor, mask_a: torch.Tensor | None, mask_b: torch.Tensor | None, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_unit_mean` of x under two masks in one kernel call (one parallel pass over both row sets)."""
    *lead, m, d = x.shape
    flat, rows = _rows(x, None)
    pair = (_masked(rows, mask_a, x), _masked(rows, mask_b, x))
    if x.device.type == "cpu":
        offsets = torch.from_numpy(np.stack([o.numpy() for o in pair], axis=1).reshape(-1, m))
    else:
        offsets = torch.stack(pair, dim=1).reshape(-1, m)  # interleaved: balanced threads
    sums = _means(load(__name__, name).unit_sums(flat, offsets, d), offsets).reshape(-1, 2, d)
    return sums[:, 0].reshape(*lead, d), sums[:, 1].reshape(*lead, d)


def _means(sums: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Sums (G, d) over the valid rows of each group (offsets >= 0) -> means, float32."""
    if offsets.device.type == "cpu":
        counts = (offsets.numpy() >= 0).sum(-1, keepdims=True).astype(np.float32)
        with np.errstate(invalid="ignore"):  # no valid row: 0 / 0 = NaN, as documented
            return torch.from_numpy(sums.numpy() / counts)
    return sums / (offsets >= 0).sum(-1, keepdim=True)


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x's storage as a 1-D tensor, and where each row starts in it: (G, m) int64, -1 if masked.

    Kernels read rows through these offsets, so a strided view (the image tokens of a
    (layer, token, hidden) array, or a broadcast) is read in place, never copied. On the CPU this
    bookkeeping (and `_masked`, `_means`, the final dot) runs in numpy, single-threaded: as
    torch ops, each would start an OpenMP parallel region, and on 2 busy cores those barriers
    cost more than the kernel's whole pass over the data.
    """
    if x.stride(-1) != 1:
        x = x.contiguous()
    *lead, m, d = x.shape
    span = 1 + sum((size - 1) * stride for size, stride in zip(x.shape, x.stride())) if x.numel() else 0
    flat = x.as_strided((span,), (1,))
    cpu = x.device.type == "cpu"
    offsets = np.zeros(x.shape[:-1], np.int64) if cpu else torch.zeros(x.shape[:-1], dtype=torch.int64, device=x.device)
    for dim, (size, stride) in enumerate(zip(x.shape[:-1], x.stride()[:-1])):
        steps = np.arange(size, dtype=np.int64) * stride if cpu else torch.arange(size, device=x.device) * stride
        offsets += steps.reshape((size,) + (1,) * (x.dim() - 2 - dim))
    offsets = torch.from_numpy(offsets) if cpu else offsets
    return flat, _masked(offsets.reshape(math.prod(lead), m), mask, x)


def _masked(offsets: torch.Tensor, mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """`_rows` offsets (G, m) of x with the rows outside mask set to -1."""
    if mask is None:
        return offsets
    if x.device.type == "cpu":
        keep = np.broadcast_to(mask.numpy(), x.shape[:-1]).reshape(offsets.shape)
        return torch.from_numpy(np.where(keep, offsets.numpy(), -1))
    return offsets.masked_fill(~mask.expand(x.shape[:-1]).reshape(offsets.shape), -1)


def _present(*masks: torch.Tensor | None) -> list[torch.Tensor]:
    return [mask for mask in masks if mask is not None]


def _check(a: torch.Tensor, b: torch.Tensor, a_mask: torch.Tensor | None, b_mask: torch.Tensor | None) -> None:
    for name, x in (("a", a), ("b", b)):
        if x.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
        if x.dim() < 2:
            raise ValueError(f"{name} must be (..., rows, hidden), got shape {tuple(x.shape)}")
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"a and b must have the same hidden size, got {a.shape[-1]} and {b.shape[-1]}")
    try:
        torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except RuntimeError as err:
        raise ValueError(f"the leading dims of a and b do not broadcast: {err}") from None
    for name, x, mask in (("a_mask", a, a_mask), ("b_mask", b, b_mask)):
        if mask is not None and (mask.dtype != torch.bool or mask.shape[-1] != x.shape[-2]):
            raise ValueError(f"{name} must be bool (..., {x.shape[-2]}), got {mask.dtype} {tuple(mask.shape)}")
