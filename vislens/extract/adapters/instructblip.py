"""InstructBLIP (``instructblip``): ViT-g + instruction-aware Q-Former + Vicuna decoder, 32 query tokens.

What differs from LLaVA: the processor puts ``num_query_tokens`` image placeholders BEFORE the
BOS token (no chat template); the Q-Former also reads the instruction (``qformer_input_ids``);
the language model is ``model.language_model`` (a causal LM) and its hidden states come back
under ``outputs.language_model_outputs``. transformers checks neither the placeholder count nor
that ``image_token_index`` is set, so the adapter does both at construction.
"""

from __future__ import annotations

import logging
import re
from typing import Any, ClassVar

import numpy as np
import torch

from vislens.errors import ModelError
from vislens.extract.adapters.base import Adapter

log = logging.getLogger("vislens.extract")


class InstructBlipAdapter(Adapter):
    """``Salesforce/instructblip-vicuna-7b`` / ``-13b`` (decoder-only language models only).

    Raises
    ------
    ModelError
        At construction, if the language model is encoder-decoder (Flan-T5), the processor
        has no Q-Former tokenizer, or its placeholders cannot match the query features.
    """

    family: ClassVar[str] = "instructblip"
    model_types: ClassVar[tuple[str, ...]] = ("instructblip",)
    hub_ids: ClassVar[tuple[str, ...]] = ("Salesforce/instructblip-vicuna-7b", "Salesforce/instructblip-vicuna-13b")

    def __init__(self, model: torch.nn.Module, processor: Any) -> None:
        super().__init__(model, processor)
        config = model.config
        if not config.use_decoder_only_language_model:
            raise ModelError(
                f"this InstructBLIP has an encoder-decoder language model ({config.text_config.model_type}); "
                f"vislens reads decoder-only ones: use {' or '.join(self.hub_ids)}"
            )
        qformer_tokenizer = getattr(processor, "qformer_tokenizer", None)
        if qformer_tokenizer is None:
            raise ModelError(
                f"InstructBLIP needs an InstructBlipProcessor (with a qformer_tokenizer), got {type(processor).__name__}"
            )
        qformer_tokenizer.padding_side = "right"
        self._check_query_tokens()
        self._set_image_token()

    def _check_query_tokens(self) -> None:
        """The processor must insert exactly as many placeholders as the Q-Former makes features."""
        n_model = int(self.model.config.num_query_tokens)
        n_processor = self.processor.num_query_tokens
        if n_processor is None:  # processor configs older than processor-side image tokens
            self.processor.num_query_tokens = n_model
        elif int(n_processor) != n_model:
            raise ModelError(
                f"the processor inserts {n_processor} image placeholders per image but the model makes {n_model} "
                f"query features, which would silently misalign; set num_query_tokens to {n_model} in "
                "processor_config.json, or load the processor of the same checkpoint"
            )

    def _set_image_token(self) -> None:
        """Set ``config.image_token_index`` from the processor's ``<image>`` token when the config lacks it."""
        config = self.model.config
        token_id = self.tokenizer.convert_tokens_to_ids(self.image_placeholder)
        rows = self.model.get_input_embeddings().num_embeddings
        if token_id is None or token_id == self.tokenizer.unk_token_id or token_id >= rows:
            raise ModelError(
                f"the tokenizer's image placeholder {self.image_placeholder!r} has id {token_id}, not a token of the "
                f"language model ({rows} embeddings); use a checkpoint revision whose tokenizer and embeddings hold it"
            )
        if config.image_token_index is None:
            log.info(
                "InstructBLIP config has no image_token_index; using the processor's %s (id %d)",
                self.image_placeholder,
                token_id,
            )
            config.image_token_index = token_id
        elif int(config.image_token_index) != token_id:
            raise ModelError(
                f"config.image_token_index is {config.image_token_index} but the processor's placeholder "
                f"{self.image_placeholder!r} is token {token_id}; load the processor of the same checkpoint"
            )

    @classmethod
    def model_class(cls) -> type:
        """`InstructBlipForConditionalGeneration`."""
        from transformers import InstructBlipForConditionalGeneration

        return InstructBlipForConditionalGeneration

    @property
    def decoder(self) -> torch.nn.Module:
        """The Llama model inside ``model.language_model`` (a LlamaForCausalLM)."""
        return self.model.language_model.model

    @property
    def vision_layers(self) -> torch.nn.ModuleList:
        """The ViT's encoder layers (``model.vision_model``), before the Q-Former."""
        return self.model.vision_model.encoder.layers

    @property
    def projector(self) -> torch.nn.Module:
        """``language_projection``: Q-Former query outputs into the decoder's space (the image tokens)."""
        return self.model.language_projection

    @property
    def image_placeholder(self) -> str:
        """``<image>`` (the processor holds it as an ``AddedToken``)."""
        return str(getattr(self.processor, "image_token", "<image>"))

    def format_prompt(self, text: str) -> str:
        """The instruction as is ('' = the query tokens and BOS alone); the processor puts the image first.

        The processor always inserts the image tokens itself, so a placeholder in the text (as in
        the study's LLaVA-templated prompts) is dropped with the whitespace around it:
        ``"USER: <image>\\nWhat is it? ASSISTANT:"`` becomes ``"USER: What is it? ASSISTANT:"``.
        """
        if self.image_placeholder in text:
            return re.sub(rf"\s*{re.escape(self.image_placeholder)}\s*", " ", text).strip()
        return text

    def expected_image_tokens(self, inputs: dict[str, torch.Tensor]) -> list[int]:
        """``num_query_tokens`` per sample: the Q-Former makes that many features per image."""
        return [int(self.model.config.num_query_tokens)] * int(inputs["input_ids"].shape[0])

    def image_grid(self, inputs: dict[str, torch.Tensor], index: int) -> tuple[int, int]:
        """(0, 0): query tokens have no patch grid."""
        return (0, 0)

    def hidden_states(self, outputs: Any) -> tuple[torch.Tensor, ...]:
        """The language model's L + 1 hidden states, from ``outputs.language_model_outputs``."""
        return outputs.language_model_outputs.hidden_states

    def vocabulary(self) -> tuple[list[str], np.ndarray]:
        """As the base, with ``<image>`` (an added, not a special, token of Vicuna's tokenizer) marked special."""
        texts, special = super().vocabulary()
        special[self.image_token_id] = True
        return texts, special

    # ---- ablation ----
    def ablation_texts(self, prompt: str, caption: str) -> tuple[str, str]:
        """(instruction, instruction + caption); the empty instruction gives the caption right after BOS."""
        context = self.format_prompt(prompt)
        return context, (f"{context} {caption.strip()}" if context else caption.strip())

    def ablation_inputs(
        self, full: dict[str, torch.Tensor], context: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The full text's inputs with the Q-Former reading the instruction alone, as in training and extraction.

        The caption being scored must not reach the image features through the Q-Former.
        """
        return {
            **full,
            "qformer_input_ids": context["qformer_input_ids"],
            "qformer_attention_mask": context["qformer_attention_mask"],
        }

    def ablation_embeddings(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(batch, token, hidden) decoder input embeddings, the projected Q-Former outputs on the placeholders.

        The same computation as the model's own forward (image features, then ``masked_scatter``).
        """
        features = self.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            qformer_input_ids=inputs["qformer_input_ids"],
            qformer_attention_mask=inputs.get("qformer_attention_mask"),
        ).pooler_output  # (batch, query, hidden)
        embeds = self.model.get_input_embeddings()(inputs["input_ids"])
        mask = self.image_mask(inputs).to(embeds.device)
        found = mask.sum(1).tolist()
        if found != [features.shape[1]] * features.shape[0]:
            raise ModelError(
                f"image placeholders per sample {found} but {features.shape[1]} query features each; "
                "the prompt or processor is wrong"
            )
        return embeds.masked_scatter(mask[..., None], features.to(embeds.device, embeds.dtype))
