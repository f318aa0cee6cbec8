"""Gemma-3 (``gemma3``): SigLIP + average-pooling projector + Gemma-3 decoder, 256 image tokens.

What differs from LLaVA:

- The prompt's placeholder is ``<start_of_image>``; the processor expands it to
  ``\\n\\n<start_of_image>`` + ``mm_tokens_per_image`` x ``<image_soft_token>`` + ``<end_of_image>\\n\\n``.
  Only the soft tokens are image tokens (``modality``); the begin/end markers are text. The
  soft tokens form a ``sqrt(mm_tokens_per_image)`` square grid (the pooled patch grid, row-major).
- **Image tokens attend to each other in both directions** (the processor's ``token_type_ids``
  make one bidirectional block per image; text stays causal). Extraction runs the model's own
  forward, so nothing changes there; ablation recomputes the kept image tokens of every setting
  (`image_attention_bidirectional`, `vislens.ablate.engine`).
- The final norm is ``x / rms(x) * (1 + w)`` (``rms_offset``); the embeddings are scaled by
  ``sqrt(hidden_size)`` inside the embedding module (hidden state 0 carries the scale), and
  every layer norms its attention and MLP outputs before the residual add
  (``post_attention_layernorm``): norm-based attention measures the attention output before that norm,
  as it does for every family (the model's own per-head ``o_proj`` contributions).
- Local layers attend within a sliding window (``sliding_window``, ``layer_types``): the model's
  own masks in extraction; the ablation decoder applies the same window (`Gemma3Adapter.ablation_decode`).
- ``Gemma3ForConditionalGeneration`` does not soft-cap its logits (only the text-only
  ``Gemma3ForCausalLM`` applies ``final_logit_softcapping``); extraction measures this anyway
  (`vislens.extract.final_norm`) and refuses a model whose logits the lens cannot reproduce.
- Pan-and-scan crops (off in the checkpoints' processor configs) give several image blocks per
  image with text between them; the adapter refuses a processor that enables it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from vislens.errors import ModelError
from vislens.extract.adapters.base import Adapter, NormSpec

GENERIC_PLACEHOLDER = "<image>"


class Gemma3Adapter(Adapter):
    """``google/gemma-3-4b-it``, ``google/gemma-3-12b-it``, ``google/gemma-3-27b-it`` (and the ``-pt`` ones)."""

    family: ClassVar[str] = "gemma3"
    model_types: ClassVar[tuple[str, ...]] = ("gemma3",)
    hub_ids: ClassVar[tuple[str, ...]] = ("google/gemma-3-4b-it", "google/gemma-3-12b-it", "google/gemma-3-27b-it")
    image_attention_bidirectional: ClassVar[bool] = True
    nested_images: ClassVar[bool] = True

    def __init__(self, model: torch.nn.Module, processor: Any) -> None:
        super().__init__(model, processor)
        if getattr(getattr(processor, "image_processor", None), "do_pan_and_scan", None):
            raise ModelError(
                "the Gemma-3 processor has do_pan_and_scan enabled, which splits an image into several image blocks "
                "with text between them; vislens reads one block per image: set do_pan_and_scan to false in "
                "preprocessor_config.json (the checkpoints' default)"
            )

    @classmethod
    def model_class(cls) -> type:
        """`Gemma3ForConditionalGeneration`."""
        from transformers import Gemma3ForConditionalGeneration

        return Gemma3ForConditionalGeneration

    def norm_spec(self) -> NormSpec:
        """The final norm: Gemma's ``x / rms(x) * (1 + w)``."""
        spec = super().norm_spec()
        return NormSpec("rms_offset", spec.eps, spec.weight)

    def format_prompt(self, text: str) -> str:
        """Put an instruction into Gemma's chat template ('' = the image alone).

        A text holding ``<start_of_image>`` is taken as formatted, and so is one holding the
        generic ``<image>`` (the study's LLaVA-style prompts), which then stands for ``<start_of_image>``.
        """
        if GENERIC_PLACEHOLDER in text and self.image_placeholder not in text:
            return text.replace(GENERIC_PLACEHOLDER, self.image_placeholder)
        return super().format_prompt(text)

    def expected_image_tokens(self, inputs: dict[str, torch.Tensor]) -> list[int]:
        """``mm_tokens_per_image`` per sample: the projector pools every image to that many features."""
        return [int(self.model.config.mm_tokens_per_image)] * int(inputs["input_ids"].shape[0])

    # ---- ablation ----
    def ablation_embeddings(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(batch, token, hidden) decoder input embeddings as `Gemma3Model.forward` builds them.

        Scaled token embeddings (image placeholders outside the vocabulary read as token 0, as in
        the model), the pooled and projected image features on the ``<image_soft_token>`` positions.
        """
        base = self.model.model
        ids = inputs["input_ids"]
        if self.image_token_id >= base.vocab_size:
            ids = ids.masked_fill(ids == self.image_token_id, 0)
        embeds = base.get_input_embeddings()(ids)
        features = base.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        features = features.reshape(-1, features.shape[-1]).to(embeds.device, embeds.dtype)
        mask = self.image_mask(inputs).to(embeds.device)
        if int(mask.sum()) != features.shape[0]:
            raise ModelError(
                f"{int(mask.sum())} image placeholders but {features.shape[0]} image features; the prompt or processor is wrong"
            )
        return embeds.masked_scatter(mask[..., None], features)

    def ablation_cache(self, keys_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> Any:
        """A `DynamicCache` of full (never windowed) layers: the sliding window is applied by the mask
        (`ablation_decode`), so that cached positions keep their indices."""
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=keys_values)

    def ablation_decode(
        self,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
    ) -> torch.Tensor:
        """As the base, with the masks of both layer types built here: the given mask (causal when
        None; a 2D padding mask is combined with causality) for global layers, and the same AND the
        sliding window ``q - k < sliding_window`` (in rotary positions; cached keys sit at 0, 1, ...)
        for local layers, as `create_masks_for_vision_model` composes them.
        """
        batch, tail = embeds.shape[:2]
        cached = 0 if cache is None else int(cache.get_seq_length())
        device = embeds.device
        if attention_mask is None or attention_mask.dim() == 2:
            keys = torch.arange(cached + tail, device=device)
            allowed = keys[None, :] <= (cached + torch.arange(tail, device=device))[:, None]  # (tail, keys)
            allowed = allowed[None].expand(batch, -1, -1)
            if attention_mask is not None:
                allowed = allowed & attention_mask.bool()[:, None, :]
        else:
            allowed = attention_mask[:, 0] == 0  # (batch, tail, keys)
        query_pos = position_ids[:, 0]  # (batch, tail)
        key_pos = torch.cat([torch.arange(cached, device=device).expand(batch, -1), query_pos], dim=1)
        window = (query_pos[:, :, None] - key_pos[:, None, :]) < int(self.text_config.sliding_window)
        masks = {}
        for kind, ok in (("full_attention", allowed), ("sliding_attention", allowed & window)):
            mask = torch.zeros(ok.shape, dtype=embeds.dtype, device=device)
            masks[kind] = mask.masked_fill(~ok, torch.finfo(embeds.dtype).min)[:, None]
        out = self.decoder(
            inputs_embeds=embeds,
            position_ids=query_pos,
            attention_mask=masks,
            use_cache=cache is not None,
            cache=cache,
        )
        return out.last_hidden_state
