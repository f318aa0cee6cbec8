"""The kernels whose results must not depend on threads, batches or the CPU, on fixed inputs.

`results()` runs each CPU kernel (auto backend: the fixed-order numba ones) on inputs made from
fixed seeds, at sizes where a share-of-the-threads partition or a vector width would show, and
returns the outputs as bytes. tests/kernels/test_fixed_order.py compares them across thread
counts in one process, and with a child process (`python -m tests.kernels.fixed_order OUT`) run
with more threads than cores and numba compiling for a generic x86-64 CPU (no AVX).
"""

from __future__ import annotations

import sys

import numpy as np
import torch


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(20261208)
    hidden = (torch.randn(3, 300, 200, generator=g) * torch.linspace(0.5, 3, 200)).half()
    hidden[1, 7] = 0  # a zero row
    return {
        "hidden": hidden,  # (layer, token, d): 300 rows > ROWS_PER_TASK x 3 threads, d not a multiple of LANES
        "image": torch.arange(300) % 7 < 5,
        "values": (torch.randn(5, 45, 2 * 12, generator=g) * 3).half(),  # GQA: 2 kv heads of 12 for 4 heads
        "w_o": (torch.randn(70, 4 * 12, generator=g) / 5).half(),
        "attn": torch.softmax(torch.randn(5, 4, 6, 45, generator=g), -1).half(),
        "lens_hidden": torch.randn(40, 96, generator=g),
        "unembedding": (torch.randn(900, 96, generator=g) / 4).half(),
    }


def results() -> dict[str, np.ndarray]:
    from vislens.kernels import lens_topk, mean_cosine, norm_attention, value_gram
    from vislens.kernels.mean_cosine import cosine_profile
    from vislens.kernels.sample_stats import attention_shares, cosine_stats

    x = inputs()
    h, image = x["hidden"], x["image"]
    gram = value_gram(x["values"], x["w_o"], 4)
    per_head, summed = norm_attention(x["attn"], gram)
    shares = attention_shares(
        summed[:, :, :], torch.arange(39, 45), torch.arange(45) < 30, torch.ones(6, dtype=torch.bool)
    )
    values, ids = lens_topk(x["lens_hidden"], x["unembedding"], 5)
    out = {
        "mean_cosine image-text": mean_cosine(h, h, a_mask=image, b_mask=~image),
        "mean_cosine image-image": mean_cosine(h, h, a_mask=image, b_mask=image),
        "cosine_profile": cosine_profile(h, h, a_mask=image, b_mask=~image),
        "cosine_stats": cosine_stats(h, image, ~image),
        "value_gram": gram,
        "norm_attention per head": per_head,
        "norm_attention summed": summed,
        "attention_shares": torch.cat([shares[0], shares[1], shares[2].flatten()]),
        "lens_topk values": values,
        "lens_topk ids": ids,
    }
    return {name: t.contiguous().numpy() for name, t in out.items()}


if __name__ == "__main__":
    np.savez(sys.argv[1], **results())
