"""Llama 3.2 Vision (``mllama``): tiled ViT + linear projector, read by gated cross-attention layers.

The image does NOT enter the decoder's sequence. The prompt holds one ``<|image|>`` token per
image (a token of the embedding table, outside ``lm_head``'s vocabulary); the vision tokens
(tiles x patches, projected to the decoder width) are the keys and values of the decoder's
cross-attention layers (``cross_attention_layers``), which the text tokens from ``<|image|>``
on read through a ``tanh``-gated residual branch. Those layers have no self-attention at all.

How vislens reads it (docs/models.md, "Mllama"):

- ``hidden``: the decoder's residual stream over the prompt's tokens, every layer (self- and
  cross-attention layers alike). ``modality`` marks the ``<|image|>`` token as the image token
  (one per image): it is where the image sits in the sequence.
- Logit lens and cosine: computed on the ``<|image|>`` token as on any family's image tokens
  (intra-image cosine is NaN: a single image token has no pair).
- Norm-based attention: defined over the self-attention layers; at cross-attention layers the
  queries attend to vision tokens, not to sequence positions, and the store holds NaN there.
- Ablation (removing image tokens from the sequence) does not apply: the one ``<|image|>``
  token is not the image; `ablation_texts` refuses it with a `ModelError`.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from vislens.errors import ModelError
from vislens.extract.adapters.base import Adapter

GENERIC_PLACEHOLDER = "<image>"


class MllamaAdapter(Adapter):
    """``meta-llama/Llama-3.2-11B-Vision-Instruct``, ``meta-llama/Llama-3.2-90B-Vision-Instruct`` (and the base models)."""

    family: ClassVar[str] = "mllama"
    model_types: ClassVar[tuple[str, ...]] = ("mllama",)
    hub_ids: ClassVar[tuple[str, ...]] = (
        "meta-llama/Llama-3.2-11B-Vision-Instruct",
        "meta-llama/Llama-3.2-90B-Vision-Instruct",
    )
    nested_images: ClassVar[bool] = True

    @classmethod
    def model_class(cls) -> type:
        """`MllamaForConditionalGeneration`."""
        from transformers import MllamaForConditionalGeneration

        return MllamaForConditionalGeneration

    @property
    def cross_attention_layers(self) -> tuple[int, ...]:
        """The decoder's cross-attention layers (0-based), from ``text_config.cross_attention_layers``."""
        return tuple(int(i) for i in self.text_config.cross_attention_layers)

    def o_proj(self, layer: int) -> torch.nn.Linear:
        """The self-attention output projection of decoder layer ``layer``.

        Raises
        ------
        ModelError
            For a cross-attention layer (no self-attention).
        """
        if layer in self.cross_attention_layers:
            raise ModelError(f"decoder layer {layer} of Mllama is a cross-attention layer; it has no self-attention")
        return super().o_proj(layer)

    def format_prompt(self, text: str) -> str:
        """Put an instruction into the chat template ('' = the image alone).

        A text holding ``<|image|>`` is taken as formatted, and so is one holding the generic
        ``<image>`` (the study's LLaVA-style prompts), which then stands for ``<|image|>``; BOS is
        put where `MllamaProcessor` puts it (before the text, after leading image tokens), so
        the tokenizer adds none.
        """
        from transformers.models.mllama.processing_mllama import build_string_from_input

        if GENERIC_PLACEHOLDER in text and self.image_placeholder not in text:
            text = text.replace(GENERIC_PLACEHOLDER, self.image_placeholder)
        if self.image_placeholder in text:
            return build_string_from_input(text, self.tokenizer.bos_token, self.image_placeholder)
        return super().format_prompt(text)

    def expected_image_tokens(self, inputs: dict[str, torch.Tensor]) -> list[int]:
        """One ``<|image|>`` token per sample (one image each)."""
        return [1] * int(inputs["input_ids"].shape[0])

    def image_grid(self, inputs: dict[str, torch.Tensor], index: int) -> tuple[int, int]:
        """(0, 0): the image token is one token, not a patch grid."""
        return (0, 0)

    def vocabulary(self) -> tuple[list[str], np.ndarray]:
        """As the base, cut to ``lm_head``'s rows: ``<|image|>`` lies beyond them (an input-only token)."""
        texts, special = super().vocabulary()
        rows = int(self.unembedding.shape[0])
        return texts[:rows], special[:rows]

    # ---- ablation ----
    def ablation_texts(self, prompt: str, caption: str) -> tuple[str, str]:
        """Refused: Mllama's image is not in the decoder's sequence.

        Raises
        ------
        ModelError
            Always.
        """
        raise ModelError(
            "image-token ablation does not apply to Mllama (Llama 3.2 Vision): the image enters the decoder through "
            "cross-attention layers, not as tokens of the sequence (its one <|image|> token is a marker, not the image); "
            "see docs/models.md, section Mllama"
        )

    def ablation_inputs(
        self, full: dict[str, torch.Tensor], context: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Refused, as `ablation_texts`."""
        return self.ablation_texts("", "")  # type: ignore[return-value]

    def ablation_embeddings(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Refused, as `ablation_texts`."""
        return self.ablation_texts("", "")  # type: ignore[return-value]
