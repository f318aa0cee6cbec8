"""value_gram written literally: every head output f_h(x_n) = v_{n,kv(h)} W_O^h, then dot products."""

from __future__ import annotations

import torch


def head_outputs(values: torch.Tensor, w_o: torch.Tensor, n_heads: int) -> torch.Tensor:
    """f_h(x_n) for every token and head: (..., N, H_kv * d) -> (..., N, H, D) float32.

    W_O^h = w_o[:, h*d:(h+1)*d].T and head h reads value head h // (H / H_kv).
    """
    d = w_o.shape[1] // n_heads
    kv_heads = values.shape[-1] // d
    v = values.float().unflatten(-1, (kv_heads, d)).repeat_interleave(n_heads // kv_heads, dim=-2)
    f = [v[..., h, :] @ w_o[:, h * d : (h + 1) * d].float().T for h in range(n_heads)]
    return torch.stack(f, dim=-2)


def value_gram(values: torch.Tensor, w_o: torch.Tensor, n_heads: int) -> torch.Tensor:
    """G_n[h, h'] = f_h(x_n) . f_h'(x_n): (..., N, H, H) float32."""
    f = head_outputs(values, w_o, n_heads)
    return f @ f.transpose(-1, -2)
