"""Analyses over a store's xarray objects; they never need the model.

Each takes an opened store (`vislens.open_store`) or a URL, computes lazily with Dask on the
active scheduler (threads, or a `distributed` cluster), and returns xarray objects; the
``*_table`` functions return long pandas tables over several stores.
"""

from __future__ import annotations

from vislens.analyze.ablation import masking_table, reduction_curve, threshold, tokens_for_reduction, truncation_curve
from vislens.analyze.cosine import cosine, cosine_per_sample, cosine_table
from vislens.analyze.logit_lens import logit_lens, logit_lens_per_sample, logit_lens_table, logit_lens_topk
from vislens.analyze.norm_attention import (
    last_query_heatmap,
    norm_attention,
    norm_attention_per_sample,
    norm_attention_table,
    top_image_tokens,
)

__all__ = [
    "masking_table",
    "reduction_curve",
    "threshold",
    "tokens_for_reduction",
    "truncation_curve",
    "cosine",
    "cosine_per_sample",
    "cosine_table",
    "last_query_heatmap",
    "logit_lens",
    "logit_lens_per_sample",
    "logit_lens_table",
    "logit_lens_topk",
    "norm_attention",
    "norm_attention_per_sample",
    "norm_attention_table",
    "top_image_tokens",
]
