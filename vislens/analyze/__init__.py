"""Analyses over a store's xarray objects; they never need the model."""

from __future__ import annotations

from vislens.analyze.cosine import cosine, cosine_per_sample, cosine_table

__all__ = ["cosine", "cosine_per_sample", "cosine_table"]
