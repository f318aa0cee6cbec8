"""Extraction: run a VLLM over images and prompts, stream its internals into a store."""

from __future__ import annotations

from vislens.extract.adapters import load_adapter
from vislens.extract.config import ExtractConfig
from vislens.extract.run import ExtractResult, extract

__all__ = ["ExtractConfig", "ExtractResult", "extract", "load_adapter"]
