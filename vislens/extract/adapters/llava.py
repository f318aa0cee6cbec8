"""LLaVA-1.5 (``llava``): CLIP ViT + MLP projector + Llama/Vicuna decoder, 576 image tokens."""

from __future__ import annotations

from typing import ClassVar

from vislens.extract.adapters.base import Adapter


class LlavaAdapter(Adapter):
    """``llava-hf/llava-1.5-7b-hf`` and its kin; the base interface is LLaVA-shaped."""

    family: ClassVar[str] = "llava"
    model_types: ClassVar[tuple[str, ...]] = ("llava",)
    hub_ids: ClassVar[tuple[str, ...]] = ("llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-13b-hf")

    @classmethod
    def model_class(cls) -> type:
        """`LlavaForConditionalGeneration`."""
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration
