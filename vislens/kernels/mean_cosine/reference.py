"""mean_cosine and cosine_profile written literally: the whole matrix of pairwise cosines."""

from __future__ import annotations

import torch


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a_i, b_j) for every pair: (..., m, d), (..., n, d) -> (..., m, n) float32.

    A zero row has cosine 0 with everything.
    """
    a, b = a.float(), b.float()
    norms = a.norm(dim=-1)[..., :, None] * b.norm(dim=-1)[..., None, :]
    dots = a @ b.transpose(-1, -2)
    return torch.where(norms > 0, dots / norms, torch.zeros_like(dots))


def _valid(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device) if mask is None else mask.bool()


def mean_cosine(
    a: torch.Tensor, b: torch.Tensor, a_mask: torch.Tensor | None = None, b_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of cos(a_i, b_j) over the valid pairs: (...) float32, NaN when there are none."""
    pairs = (_valid(a, a_mask)[..., :, None] & _valid(b, b_mask)[..., None, :]).float()
    return (cosine_matrix(a, b) * pairs).sum((-1, -2)) / pairs.sum((-1, -2))


def cosine_profile(
    a: torch.Tensor, b: torch.Tensor, a_mask: torch.Tensor | None = None, b_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean cosine of each row of a to the valid rows of b: (..., m) float32, NaN where masked."""
    b_valid = _valid(b, b_mask)[..., None, :].float()
    profile = (cosine_matrix(a, b) * b_valid).sum(-1) / b_valid.sum(-1)
    return torch.where(_valid(a, a_mask), profile, torch.full_like(profile, float("nan")))
