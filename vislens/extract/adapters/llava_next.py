"""LLaVA-NeXT / LLaVA-1.6 (``llava_next``): any-resolution CLIP tiles + MLP projector + Mistral/Vicuna.

What differs from LLaVA-1.5: the image is cut into tiles of a best-fitting resolution, so the
number of image tokens depends on the image's size: a base image of (image_size / patch_size)^2
tokens, then the tile features with the padding removed, one learned ``image_newline`` token at
the end of each row. All of them sit on ``<image>`` placeholders (one run), so the image mask is
LLaVA's; the count is checked against what the model's own packing gives for each image size.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from vislens.extract.adapters.base import Adapter


class LlavaNextAdapter(Adapter):
    """``llava-hf/llava-v1.6-mistral-7b-hf``, ``llava-hf/llava-v1.6-vicuna-7b-hf`` and their kin."""

    family: ClassVar[str] = "llava_next"
    model_types: ClassVar[tuple[str, ...]] = ("llava_next",)
    hub_ids: ClassVar[tuple[str, ...]] = (
        "llava-hf/llava-v1.6-mistral-7b-hf",
        "llava-hf/llava-v1.6-vicuna-7b-hf",
        "llava-hf/llava-v1.6-vicuna-13b-hf",
    )
    fixed_image_tokens: ClassVar[bool] = False

    @classmethod
    def model_class(cls) -> type:
        """`LlavaNextForConditionalGeneration`."""
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration

    def image_features_count(self, height: int, width: int) -> int:
        """Image tokens the model makes for an image of ``height`` x ``width`` pixels (its packing, replayed on shapes)."""
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            image_size_to_num_patches,
            unpad_image,
        )

        cfg = self.model.config
        tile = cfg.vision_config.image_size
        side = tile // cfg.vision_config.patch_size
        base = side * side + (1 if cfg.vision_feature_select_strategy == "full" else 0)
        size = [int(height), int(width)]
        if image_size_to_num_patches(size, cfg.image_grid_pinpoints, tile) <= 1:
            return base + 1  # the base image and one newline
        rows, cols = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, tile)
        _, h, w = unpad_image(torch.empty(0, rows * side, cols * side), size).shape
        return base + h * (w + 1)

    def expected_image_tokens(self, inputs: dict[str, torch.Tensor]) -> list[int]:
        """Per sample, the image tokens the model's packing makes for its image's size (``image_sizes``)."""
        return [self.image_features_count(h, w) for h, w in inputs["image_sizes"].tolist()]

    def image_grid(self, inputs: dict[str, torch.Tensor], index: int) -> tuple[int, int]:
        """(0, 0): base image, unpadded tiles and newline tokens form no single grid."""
        return (0, 0)
