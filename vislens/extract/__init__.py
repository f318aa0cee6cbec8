"""Extraction: run a VLLM over images and prompts, stream its internals into a store."""

from __future__ import annotations

from vislens.extract.adapters import load_adapter
from vislens.extract.config import ExtractConfig
from vislens.extract.run import ExtractResult, extract
from vislens.extract.toy_model import ToySpec, build_toy_model, toy_model_path

__all__ = ["ExtractConfig", "ExtractResult", "ToySpec", "build_toy_model", "extract", "load_adapter", "toy_model_path"]
