"""Qwen2-VL and Qwen2.5-VL (``qwen2_vl``, ``qwen2_5_vl``): native-resolution ViT + patch merger + Qwen2.

What differs from LLaVA:

- The image is resized to a multiple of ``patch_size * merge_size`` within the processor's pixel
  budget, so the number of image tokens (``<|image_pad|>``, between ``<|vision_start|>`` and
  ``<|vision_end|>``) is ``t * h * w / merge_size^2`` for the image's ``image_grid_thw``; the
  grid of image tokens is ``h / merge_size`` rows by ``w / merge_size`` columns.
- Rotary positions are 3-D (temporal, height, width; `get_rope_index`): text tokens have the
  same value on all three, the image tokens of an image starting at p have ``(p, p + row,
  p + col)``, and the text after the image continues from 1 + the largest position of the image.
- The processor is loaded without its video processor (`image_text_processor`): vislens
  never feeds videos, and transformers builds Qwen's video processor only where torchvision is
  installed. The image path is Qwen2-VL's own, which Qwen2.5-VL shares unchanged.

Ablation (``remove`` style) positions, the definition vislens uses for a truncated or masked
image: kept image tokens keep their 3-D positions; the text after the image continues from 1 +
the largest position of any kept token before it (the text before the image if no image token is
kept). With nothing removed this is `get_rope_index`'s own rule, and truncating to whole rows of
the grid gives exactly what `get_rope_index` gives an image of those rows. ``block`` style keeps
every position.
"""

from __future__ import annotations

from functools import cache
from typing import Any, ClassVar

import torch

from vislens.extract.adapters.base import Adapter

GENERIC_PLACEHOLDER = "<image>"


@cache
def image_text_processor() -> type:
    """`Qwen2VLProcessor` with an image processor and a tokenizer only (no video processor).

    Its ``from_pretrained`` loads any Qwen2-VL or Qwen2.5-VL checkpoint; images and text are
    processed by Qwen2-VL's own code. (A function, so that ``import vislens`` stays free of transformers.)
    """
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageTextQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageTextQwen2VLProcessor


class Qwen2VLAdapter(Adapter):
    """``Qwen/Qwen2-VL-2B-Instruct``, ``Qwen/Qwen2-VL-7B-Instruct``, ``Qwen/Qwen2.5-VL-3B-Instruct``, ``-7B``."""

    family: ClassVar[str] = "qwen2_vl"
    model_types: ClassVar[tuple[str, ...]] = ("qwen2_vl", "qwen2_5_vl")
    hub_ids: ClassVar[tuple[str, ...]] = (
        "Qwen/Qwen2-VL-2B-Instruct",
        "Qwen/Qwen2-VL-7B-Instruct",
        "Qwen/Qwen2.5-VL-3B-Instruct",
        "Qwen/Qwen2.5-VL-7B-Instruct",
    )
    fixed_image_tokens: ClassVar[bool] = False

    @classmethod
    def load_processor(cls, name_or_path: str, revision: str | None) -> Any:
        """The checkpoint's image processor, tokenizer and chat template (see `image_text_processor`)."""
        return image_text_processor().from_pretrained(name_or_path, revision=revision)

    def format_prompt(self, text: str) -> str:
        """Put an instruction into Qwen's chat template ('' = the image alone).

        A text holding ``<|image_pad|>`` is taken as fully formatted, and so is one holding the
        generic ``<image>`` (the study's LLaVA-style prompts), which then stands for
        ``<|vision_start|><|image_pad|><|vision_end|>``.
        """
        if GENERIC_PLACEHOLDER in text and self.image_placeholder not in text:
            return text.replace(GENERIC_PLACEHOLDER, f"<|vision_start|>{self.image_placeholder}<|vision_end|>")
        return super().format_prompt(text)

    @property
    def merge_size(self) -> int:
        """Patches merged per image token along each side (the model's ``spatial_merge_size``)."""
        return int(self.model.config.vision_config.spatial_merge_size)

    def expected_image_tokens(self, inputs: dict[str, torch.Tensor]) -> list[int]:
        """Per sample (one image each), ``t * h * w / merge_size^2`` of its ``image_grid_thw``."""
        return (inputs["image_grid_thw"].prod(-1) // self.merge_size**2).tolist()

    def image_grid(self, inputs: dict[str, torch.Tensor], index: int) -> tuple[int, int]:
        """(rows, columns) of image tokens: the merged ``h`` and ``w`` of sample ``index``'s image."""
        t, h, w = (int(v) for v in inputs["image_grid_thw"][index])
        return (h // self.merge_size, w // self.merge_size) if t == 1 else (0, 0)

    # ---- ablation ----
    def ablation_positions(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(batch, 3, token) int64: the model's own `get_rope_index` positions of the inputs."""
        positions, _ = self.model.model.get_rope_index(
            input_ids=inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
        )
        return positions.permute(1, 0, 2)

    def ablated_positions(
        self, positions: torch.Tensor, image: torch.Tensor, removed: torch.Tensor, shift: bool
    ) -> torch.Tensor:
        """(setting, 3, token): kept image tokens keep their 3-D positions; in ``remove`` style the
        text after the image continues from 1 + the largest position of a kept token before it.
        """
        out = positions.expand(removed.shape[0], -1, -1)
        index = torch.arange(positions.shape[1], device=positions.device)
        if not shift or not bool(image.any()):
            return out
        after = index > int(index[image].max())
        if not bool(after.any()):
            return out
        kept = ~removed & ~after  # (setting, token): kept tokens up to the end of the image
        top = torch.where(kept[:, None, :], positions[None], -1).amax(dim=(1, 2))
        drop = positions[:, after].min() - (top + 1)  # how far the text after the image moves down
        return out - drop[:, None, None] * after[None, None, :]
