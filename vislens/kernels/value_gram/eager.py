"""backend="torch": value_gram in plain torch, a slice of the model dimension D at a time, so
the (..., N, H, D) head outputs are never held whole."""

from __future__ import annotations

import torch

_D_SLICE = 512


def value_gram(values: torch.Tensor, w_o: torch.Tensor, n_heads: int) -> torch.Tensor:
    """values: (B, N, H_kv * d); w_o: (D, H * d) -> (B, N, H, H) float32."""
    batch, n, _ = values.shape
    d = w_o.shape[1] // n_heads
    kv_heads = values.shape[-1] // d
    v = values.float().unflatten(-1, (kv_heads, d)).transpose(1, 2)  # (B, H_kv, N, d)
    v = v.repeat_interleave(n_heads // kv_heads, dim=1)  # (B, H, N, d)
    w = w_o.float().T.reshape(n_heads, d, -1)  # W_O^h: (H, d, D)
    gram = torch.zeros(batch, n, n_heads, n_heads, dtype=torch.float32, device=values.device)
    for k in range(0, w.shape[-1], _D_SLICE):
        f = (v @ w[:, :, k : k + _D_SLICE]).transpose(1, 2)  # (B, N, H, slice)
        gram += f @ f.transpose(-1, -2)
    return gram
