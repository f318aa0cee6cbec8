"""backend="torch": the identity mean_ij cos(a_i, b_j) = mean_i(a_i/|a_i|) . mean_j(b_j/|b_j|)
in plain torch, for any device (it holds one float32 copy of the input)."""

from __future__ import annotations

import torch


def _units(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    norms = x.norm(dim=-1, keepdim=True)
    return torch.where(norms > 0, x / norms, torch.zeros_like(x))


def unit_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of x_i/|x_i| over the valid rows: (..., m, d) -> (..., d) float32 (NaN if none)."""
    units = _units(x)
    if mask is None:
        return units.sum(-2) / x.shape[-2]
    weights = mask.expand(x.shape[:-1]).float()
    return (units * weights[..., None]).sum(-2) / weights.sum(-1, keepdim=True)


def unit_dots(x: torch.Tensor, mask: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
    """(x_i/|x_i|) . u for every row: x (..., m, d), u (..., d) -> (..., m) float32, NaN where masked."""
    dots = (_units(x) @ u[..., :, None])[..., 0]
    return dots if mask is None else torch.where(mask, dots, torch.full_like(dots, float("nan")))
