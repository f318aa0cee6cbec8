"""LLaVA-OneVision (``llava_onevision``): SigLIP any-resolution tiles + MLP projector + Qwen2.

What differs from LLaVA-NeXT (`vislens.extract.adapters.llava_next`), whose packing it shares:

- The vision tower is SigLIP (no class token; ``vision_feature_select_strategy="full"``), so the
  base image gives ``(image_size / patch_size)^2`` features exactly.
- ``vision_aspect_ratio = "anyres_max_N"``: when the unpadded tile features exceed N base images
  (by more than 10 %), the model shrinks them by bilinear interpolation before adding the row
  newlines. `LlavaOnevisionAdapter.image_features_count` replays this on shapes.
- The processor is loaded without its video processor (`image_text_processor`): transformers
  builds that one only where torchvision is installed, and vislens feeds no videos.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any, ClassVar

import torch

from vislens.extract.adapters.llava_next import LlavaNextAdapter


@cache
def image_text_processor() -> type:
    """`LlavaOnevisionProcessor` with an image processor and a tokenizer only (no video processor).

    Its ``from_pretrained`` loads any LLaVA-OneVision checkpoint; images and text go through
    LLaVA-OneVision's own processor code.
    """
    from transformers import LlavaOnevisionProcessor

    class ImageTextLlavaOnevisionProcessor(LlavaOnevisionProcessor):
        def __init__(
            self,
            image_processor: Any = None,
            tokenizer: Any = None,
            num_image_tokens: int | None = None,
            vision_feature_select_strategy: str | None = None,
            chat_template: str | None = None,
            image_token: str = "<image>",
            video_token: str = "<video>",
            vision_aspect_ratio: str = "anyres_max_9",
            **kwargs: Any,
        ):
            # the parent passes video_processor=None positionally; the attributes of this class
            # (its __init__ signature) are the image processor and tokenizer only, so it is dropped
            super().__init__(
                image_processor,
                tokenizer,
                None,
                num_image_tokens=num_image_tokens,
                vision_feature_select_strategy=vision_feature_select_strategy,
                chat_template=chat_template,
                image_token=image_token,
                video_token=video_token,
                vision_aspect_ratio=vision_aspect_ratio,
                **kwargs,
            )

    return ImageTextLlavaOnevisionProcessor


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """``llava-hf/llava-onevision-qwen2-0.5b-ov-hf``, ``-7b-ov-hf`` and their kin."""

    family: ClassVar[str] = "llava_onevision"
    model_types: ClassVar[tuple[str, ...]] = ("llava_onevision",)
    hub_ids: ClassVar[tuple[str, ...]] = (
        "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
        "llava-hf/llava-onevision-qwen2-7b-ov-hf",
        "llava-hf/llava-onevision-qwen2-72b-ov-hf",
    )

    @classmethod
    def model_class(cls) -> type:
        """`LlavaOnevisionForConditionalGeneration`."""
        from transformers import LlavaOnevisionForConditionalGeneration

        return LlavaOnevisionForConditionalGeneration

    @classmethod
    def load_processor(cls, name_or_path: str, revision: str | None) -> Any:
        """The checkpoint's image processor, tokenizer and chat template (see `image_text_processor`)."""
        return image_text_processor().from_pretrained(name_or_path, revision=revision)

    def image_features_count(self, height: int, width: int) -> int:
        """Image tokens the model makes for an image of ``height`` x ``width`` pixels (its packing, replayed on shapes)."""
        from transformers.models.llava_onevision.modeling_llava_onevision import (
            get_anyres_image_grid_shape,
            image_size_to_num_patches,
            unpad_image,
        )

        cfg = self.model.config
        tile = cfg.vision_config.image_size
        side = tile // cfg.vision_config.patch_size
        base = side * side
        size = [int(height), int(width)]
        if image_size_to_num_patches(size, cfg.image_grid_pinpoints, tile) <= 1:
            return base + 1  # the base image and one newline
        rows, cols = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, tile)
        _, h, w = unpad_image(torch.empty(0, rows * side, cols * side), size).shape
        max_tiles = int(cfg.vision_aspect_ratio.strip("anyres_max_"))
        ratio = math.sqrt(h * w / (max_tiles * side**2))
        if ratio > 1.1:  # the model shrinks the tile features (bilinear) to about max_tiles base images
            h, w = int(h // ratio), int(w // ratio)
        return base + h * (w + 1)
