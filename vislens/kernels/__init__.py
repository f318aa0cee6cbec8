"""Fused kernels for the analyses: logit lens top-k, mean cosine similarity, norm-based attention.

Each operation lives in its own folder (`reference.py` the formula written literally, then the
numba, Triton and plain-torch backends) behind one dispatch function taking
`backend="auto" | "triton" | "numba" | "torch"`. numba and Triton are imported only when used.
"""

from __future__ import annotations

from vislens.kernels._backend import BACKENDS
from vislens.kernels.lens_topk import LensNorm, LensUnembedding, lens_topk, prepare_unembedding
from vislens.kernels.mean_cosine import cosine_profile, mean_cosine
from vislens.kernels.norm_attention import norm_attention
from vislens.kernels.value_gram import value_gram

__all__ = [
    "BACKENDS",
    "LensNorm",
    "LensUnembedding",
    "cosine_profile",
    "lens_topk",
    "mean_cosine",
    "norm_attention",
    "prepare_unembedding",
    "value_gram",
]
