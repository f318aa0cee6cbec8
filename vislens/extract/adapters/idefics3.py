"""Idefics3 (``idefics3``): SigLIP tiles + pixel-shuffle connector + Llama 3, image splitting.

What differs from LLaVA:

- The processor resizes the image (longest edge at most ``size``), splits it into tiles of
  ``max_image_size`` and adds the whole image downscaled as a last "global" tile; each tile gives
  ``image_seq_len`` image tokens. The number of image tokens therefore depends on the image size.
- The image tokens are NOT one run: each tile's ``<image>`` run follows a
  ``<fake_token_around_image>`` and a ``<row_i_col_j>`` (or ``<global-img>``) text token, rows end
  with a newline. ``modality`` marks only the ``<image>`` positions as image.
- The language model is ``model.model.text_model``.

Ablation: removing image tokens ``[s, e)`` removes the input positions from image token s through
image token e - 1, tile markers between them included (`vislens.ablate.engine`); truncating to k
keeps the first k image tokens and the markers before them, and drops everything from image
token k through the last image token (the closing ``<fake_token_around_image>`` stays).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from vislens.extract.adapters.base import Adapter


class Idefics3Adapter(Adapter):
    """``HuggingFaceM4/Idefics3-8B-Llama3``."""

    family: ClassVar[str] = "idefics3"
    model_types: ClassVar[tuple[str, ...]] = ("idefics3",)
    hub_ids: ClassVar[tuple[str, ...]] = ("HuggingFaceM4/Idefics3-8B-Llama3",)
    fixed_image_tokens: ClassVar[bool] = False
    contiguous_image_tokens: ClassVar[bool] = False

    @classmethod
    def model_class(cls) -> type:
        """`Idefics3ForConditionalGeneration`."""
        from transformers import Idefics3ForConditionalGeneration

        return Idefics3ForConditionalGeneration

    @property
    def decoder(self) -> torch.nn.Module:
        """The Llama model at ``model.model.text_model``."""
        return self.model.model.text_model

    def expected_image_tokens(self, inputs: dict[str, torch.Tensor]) -> list[int]:
        """Per sample, its tiles times the model's ``image_seq_len`` (all-zero tiles are padding, as in the model)."""
        pixels = inputs["pixel_values"]
        real = (pixels != 0).flatten(2).any(-1)  # (batch, tiles)
        return (real.sum(1) * int(self.model.model.image_seq_len)).tolist()

    def image_grid(self, inputs: dict[str, torch.Tensor], index: int) -> tuple[int, int]:
        """(0, 0): tiles and a global image form no single grid."""
        return (0, 0)

    def vocabulary(self) -> tuple[list[str], np.ndarray]:
        """As the base, with every special added token (the tile markers ``<row_i_col_j>``, ``<global-img>``) marked special.

        The processor re-registers only three of them as special tokens of the tokenizer.
        """
        texts, special = super().vocabulary()
        for index, token in self.tokenizer.added_tokens_decoder.items():
            if token.special and index < len(special):
                special[index] = True
        return texts, special
