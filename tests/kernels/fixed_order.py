"""The kernels whose results must not depend on threads, batches or the CPU, on fixed inputs.

`results()` runs each CPU kernel (auto backend: the fixed-order numba ones) on inputs made from
fixed seeds, at sizes where a share-of-the-threads partition or a vector width would show, and
returns the outputs as bytes. tests/kernels/test_fixed_order.py compares them across thread
counts in one process, and with a child process (`python -m tests.kernels.fixed_order OUT`) run
with more threads than cores, numba compiling for a generic x86-64 CPU (no AVX) and torch's
CPU kernels at their default (non-AVX) level (ATEN_CPU_CAPABILITY=default).
"""

from __future__ import annotations

import sys

import numpy as np
import torch


def inputs() -> dict[str, torch.Tensor]:
    """Made with numpy's generator: torch's own random and elementwise kernels may differ between
    CPU levels (ATEN_CPU_CAPABILITY), and the inputs must not."""
    rng = np.random.default_rng(20261208)

    def normal(*shape: int, scale: float = 1.0, dtype: type = np.float16) -> torch.Tensor:
        return torch.from_numpy((rng.standard_normal(shape) * scale).astype(dtype))

    hidden = torch.from_numpy((rng.standard_normal((3, 300, 200)) * np.linspace(0.5, 3, 200)).astype(np.float16))
    hidden[1, 7] = 0  # a zero row
    attn = rng.random((5, 4, 6, 45)) ** 4
    return {
        "hidden": hidden,  # (layer, token, d): 300 rows > ROWS_PER_TASK x 3 threads, d not a multiple of LANES
        "image": torch.arange(300) % 7 < 5,
        "values": normal(5, 45, 2 * 12, scale=3),  # GQA: 2 kv heads of 12 for 4 heads
        "w_o": normal(70, 4 * 12, scale=0.2),
        "attn": torch.from_numpy((attn / attn.sum(-1, keepdims=True)).astype(np.float16)),
        "lens_hidden": normal(40, 96, dtype=np.float32),
        "unembedding": normal(900, 96, scale=0.25),
    }


def results() -> dict[str, np.ndarray]:
    from vislens.kernels import LensNorm, lens_topk, mean_cosine, norm_attention, value_gram
    from vislens.kernels.lens_topk.reference import apply_norm
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
    rng = np.random.default_rng(7)
    weight = torch.from_numpy((rng.random(96) + 0.5).astype(np.float32))
    bias = torch.from_numpy((rng.standard_normal(96) / 4).astype(np.float32))
    normed = {
        kind: lens_topk(x["lens_hidden"] * 40, x["unembedding"], 3, norm=norm)[0]
        for kind, norm in (
            ("rms", LensNorm("rms", 1e-6, weight)),
            ("rms_offset", LensNorm("rms_offset", 1e-6, weight - 1)),
            ("layer", LensNorm("layer", 1e-5, weight, bias)),
        )
    }
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
        **{f"lens_topk values, {kind} norm": v for kind, v in normed.items()},
        "apply_norm layer": apply_norm(x["lens_hidden"] * 40, LensNorm("layer", 1e-5, weight, bias)),
    }
    return {name: t.contiguous().numpy() for name, t in out.items()}


if __name__ == "__main__":
    np.savez(sys.argv[1], **results())
