"""Norm-based attention (Kobayashi et al., 2020) written literally.

`norm_attention_from_values` materialises every alpha^h_qj f_h(x_j) (small shapes only);
`norm_attention` evaluates the same norms from the Gram matrices, |sum_h a_h f_h|^2 = a^T G a.
"""

from __future__ import annotations

import torch


def norm_attention_from_values(attn: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Norms of the weighted head outputs, from the vectors themselves.

    attn: (..., H, Q, N) attention weights alpha^h_qj; f: (..., N, H, D) head-transformed values
    f_h(x_j). Returns per_head |alpha^h_qj f_h(x_j)|, (..., H, Q, N), and summed
    |sum_h alpha^h_qj f_h(x_j)|, (..., Q, N), both float32.
    """
    weighted = attn.float()[..., None] * f.float().transpose(-3, -2)[..., :, None, :, :]  # (..., H, Q, N, D)
    return weighted.norm(dim=-1), weighted.sum(-4).norm(dim=-1)


def norm_attention(attn: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same norms from gram: (..., N, H, H), G_j[h, h'] = f_h(x_j) . f_h'(x_j).

    per_head = alpha * sqrt(G_j[h, h]); summed = sqrt(a^T G_j a), a = alpha[..., :, q, j].
    """
    a, gram = attn.float(), gram.float()
    head_norms = gram.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()  # (..., N, H)
    per_head = a * head_norms.transpose(-1, -2)[..., :, None, :]
    squared = torch.einsum("...hqn,...nhk,...kqn->...qn", a, gram, a)
    return per_head, squared.clamp(min=0).sqrt()
