"""The adapter interface: everything vislens needs to know about one model family.

The rest of vislens talks to models only through an `Adapter`. A family subclasses it,
names the ``model_type`` values it handles, and overrides what differs from the
LLaVA-style default (a decoder at ``model.model.language_model``, ``lm_head``, image
placeholders expanded by the processor into ``input_ids``).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from vislens.errors import ModelError


@dataclass(frozen=True)
class AttentionShape:
    """Heads of the decoder's self-attention."""

    n_heads: int
    n_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class NormSpec:
    """The decoder's final norm, enough to apply it without the model.

    ``kind`` is ``"rms"`` (x / rms(x) * w), ``"rms_offset"`` (x / rms(x) * (1 + w), Gemma) or
    ``"layer"`` (LayerNorm with optional bias).
    """

    kind: str
    eps: float
    weight: np.ndarray
    bias: np.ndarray | None = None


ROLE_MARKER = re.compile(r"\s*\b[A-Z][A-Za-z]*:\s*$")
"""A trailing chat role marker of a fully formatted prompt, such as ``ASSISTANT:``."""

GENERIC_PLACEHOLDER = "<image>"
"""The image placeholder of the study's fully formatted prompts (LLaVA's), which every family accepts."""


def _first_placeholder(text: str, placeholder: str) -> tuple[int, int]:
    """Characters [start, end) of the first image placeholder in ``text``: the family's own or the generic
    ``<image>`` (whichever comes first; the longer one where both start at the same character); (-1, -1) if none."""
    found = [
        (text.find(marker), -len(marker)) for marker in {placeholder, GENERIC_PLACEHOLDER} if marker and marker in text
    ]
    if not found:
        return -1, -1
    start, negative_length = min(found)
    return start, start - negative_length


def instruction_core(instruction: str, placeholder: str) -> str:
    """The instruction proper of a prompt as given.

    A plain instruction is itself (stripped). A fully formatted prompt holding an image
    placeholder (the family's own, or the generic ``<image>`` of the study's
    ``"USER: <image>\\nWhat is ...? ASSISTANT:"``, which every family's `Adapter.format_prompt`
    accepts) is the text after the placeholder without a trailing role marker (an upper-case
    word and a colon): the words before the placeholder and the marker are the template's.
    """
    instruction = instruction.strip()
    start, end = _first_placeholder(instruction, placeholder)
    if start >= 0:
        instruction = instruction[end:].strip()
        instruction = ROLE_MARKER.sub("", instruction).strip()
    return instruction


def _instruction_span(text: str, instruction: str, placeholder: str) -> tuple[int, int]:
    """Characters [start, end) of the instruction (`instruction_core`) inside the formatted prompt.

    The first occurrence after the first image placeholder (the family's own or the generic
    ``<image>``; anywhere, if none is found after it); (-1, -1) when empty.
    """
    core = instruction_core(instruction, placeholder)
    if not core:
        return -1, -1
    after = max(_first_placeholder(text, placeholder)[1], 0)
    start = text.find(core, after)
    if start < 0:
        start = text.find(core)
    return (start, start + len(core)) if start >= 0 else (-1, -1)


class Adapter:
    """Model knowledge for one family; construct with a loaded model and its processor."""

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    hub_ids: ClassVar[tuple[str, ...]] = ()
    fixed_image_tokens: ClassVar[bool] = True
    """Whether every image gives the same number of image tokens (then counts are cached)."""
    contiguous_image_tokens: ClassVar[bool] = True
    """Whether one image's tokens are one run; False where text tokens (tile markers) lie between them."""
    nested_images: ClassVar[bool] = False
    """Whether the processor wants one list of images per sample (Gemma-3, SmolVLM read a flat list as one sample's images)."""
    image_attention_bidirectional: ClassVar[bool] = False
    """Whether the image tokens of one image attend to each other in both directions (Gemma-3); then
    removing an image token changes the keys and values of the image tokens before it too (`vislens.ablate`)."""

    def __init__(self, model: torch.nn.Module, processor: Any) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer.padding_side = "right"
        self._count_cache: dict[tuple, tuple[int, int]] = {}

    # ---- loading -------------------------------------------------------------------
    @classmethod
    def model_class(cls) -> type:
        """The transformers class that loads this family's checkpoints."""
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText

    @classmethod
    def load_processor(cls, name_or_path: str, revision: str | None) -> Any:
        """Load the processor of a checkpoint."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(name_or_path, revision=revision)

    # ---- structure -----------------------------------------------------------------
    @property
    def text_config(self) -> Any:
        """Config of the language decoder."""
        return self.model.config.get_text_config()

    @property
    def decoder(self) -> torch.nn.Module:
        """The language decoder (has ``layers`` and ``norm``)."""
        return self.model.model.language_model

    @property
    def layers(self) -> torch.nn.ModuleList:
        """Decoder layers, in order."""
        return self.decoder.layers

    @property
    def final_norm(self) -> torch.nn.Module:
        """The norm applied after the last decoder layer."""
        return self.decoder.norm

    @property
    def cross_attention_layers(self) -> tuple[int, ...]:
        """Decoder layers (0-based) whose attention reads the image features instead of the sequence (Mllama).

        They have no self-attention over the tokens: norm-based attention is not defined there and
        the store holds NaN for them (`vislens.extract.capture`).
        """
        return ()

    @property
    def unembedding(self) -> torch.Tensor:
        """The unembedding matrix W_U, (vocab, hidden)."""
        return self.model.get_output_embeddings().weight

    # ---- capture points (``vislens extract --capture``) --------------------------------------
    @property
    def vision_layers(self) -> torch.nn.ModuleList | None:
        """The vision tower's encoder layers, when the tower sees one image per sample (else None)."""
        tower = getattr(self.model.model, "vision_tower", None)
        tower = getattr(tower, "vision_model", tower)  # transformers 5 flattens CLIPVisionModel
        return getattr(getattr(tower, "encoder", None), "layers", None)

    @property
    def projector(self) -> torch.nn.Module | None:
        """The module that maps image features into the decoder's space (one row per image token)."""
        return getattr(self.model.model, "multi_modal_projector", None)

    def decoder_attention(self, layer: int) -> torch.nn.Module:
        """Decoder layer ``layer``'s (0-based) self-attention block; its output is what it adds to the residual stream."""
        return self.layers[layer].self_attn

    def decoder_mlp(self, layer: int) -> torch.nn.Module:
        """Decoder layer ``layer``'s (0-based) MLP block."""
        return self.layers[layer].mlp

    def o_proj(self, layer: int) -> torch.nn.Linear:
        """The attention output projection of decoder layer ``layer``."""
        return self.layers[layer].self_attn.o_proj

    @property
    def attention_shape(self) -> AttentionShape:
        """Heads, kv heads and head dim of the decoder."""
        cfg = self.text_config
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return AttentionShape(heads, kv, head_dim)

    @property
    def image_token_id(self) -> int:
        """Token id of the image placeholder in ``input_ids``."""
        cfg = self.model.config
        value = getattr(cfg, "image_token_id", None)
        if value is None:
            value = getattr(cfg, "image_token_index", None)
        if value is None:
            raise ModelError(f"{type(self.model).__name__} config has no image token id")
        return int(value)

    def norm_spec(self) -> NormSpec:
        """The final norm as plain arrays."""
        norm = self.final_norm
        eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
        weight = norm.weight.detach().float().cpu().numpy()
        bias = getattr(norm, "bias", None)
        kind = "layer" if isinstance(norm, torch.nn.LayerNorm) else "rms"
        return NormSpec(kind, float(eps), weight, None if bias is None else bias.detach().float().cpu().numpy())

    # ---- prompts and inputs ----------------------------------------------------------
    @property
    def image_placeholder(self) -> str:
        """The text that stands for one image in a prompt."""
        return getattr(self.processor, "image_token", None) or "<image>"

    def format_prompt(self, text: str) -> str:
        """Put an instruction into the model's chat template ('' = the image alone).

        A text that already holds the image placeholder is taken as fully formatted.
        """
        if self.image_placeholder in text:
            return text
        content: list[dict[str, str]] = [{"type": "image"}]
        if text:
            content.append({"type": "text", "text": text})
        template = getattr(self.processor, "chat_template", None)
        if template:
            messages = [{"role": "user", "content": content}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return f"{self.image_placeholder}\n{text}".rstrip()

    def special_tokens_kwargs(self, texts: list[str]) -> dict[str, bool]:
        """``add_special_tokens=False`` when every text already starts with the BOS token (a chat template wrote it).

        transformers' own ``processor.apply_chat_template(..., tokenize=True)`` does the same, so a
        tokenizer that adds BOS itself never gives two.
        """
        bos = getattr(self.tokenizer, "bos_token", None)
        if bos and texts and all(text.startswith(bos) for text in texts):
            return {"add_special_tokens": False}
        return {}

    def _one_bos_each(self, texts: list[str]) -> list[str]:
        """``texts`` such that each is encoded as it would be alone, in one batch call.

        A batch may mix texts that start with BOS (a chat template wrote it) and texts that do not
        (the study's fully formatted ``"USER: <image>..."`` prompts). Encoded alone, the first get no
        BOS from the tokenizer and the second get the tokenizer's own; one batch call takes one
        ``add_special_tokens``. Where the tokenizer adds BOS itself, the second are given the BOS
        token's text, so that every text of the batch starts with it and none gets a second one.
        """
        bos = getattr(self.tokenizer, "bos_token", None)
        starts = [bool(bos) and text.startswith(bos) for text in texts]
        if all(starts) or not any(starts):
            return texts
        ids = self.tokenizer("a")["input_ids"]
        if not ids or ids[0] != self.tokenizer.bos_token_id:
            return texts
        return [text if start else bos + text for text, start in zip(texts, starts, strict=True)]

    def encode(self, images: list[Image.Image], texts: list[str]) -> dict[str, torch.Tensor]:
        """Processor outputs for a batch, right-padded (padding never shifts positions); each text is
        encoded as it would be alone (one BOS, `_one_bos_each`)."""
        texts = self._one_bos_each(list(texts))
        batch = [[image] for image in images] if self.nested_images else images
        return dict(
            self.processor(
                images=batch, text=texts, return_tensors="pt", padding=True, **self.special_tokens_kwargs(texts)
            )
        )

    def image_mask(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Boolean (batch, token): positions holding image features."""
        return inputs["input_ids"] == self.image_token_id

    def expected_image_tokens(self, inputs: dict[str, torch.Tensor]) -> list[int] | None:
        """Image tokens each sample must have, when the family knows it (checked)."""
        return None

    def image_grid(self, inputs: dict[str, torch.Tensor], index: int) -> tuple[int, int]:
        """Rows and columns of sample ``index``'s image-token grid, (0, 0) if unknown."""
        n = int(self.image_mask(inputs)[index].sum())
        side = int(round(n**0.5))
        return (side, side) if side * side == n else (0, 0)

    def count_tokens(self, text: str, image_size: tuple[int, int]) -> tuple[int, int]:
        """(tokens, image tokens) the processor gives this prompt with an image of this size."""
        key = (text,) if self.fixed_image_tokens else (text, image_size)
        if key not in self._count_cache:
            blank = Image.new("RGB", image_size if image_size[0] > 0 else (64, 64))
            inputs = self.encode([blank], [text])
            mask = inputs["attention_mask"][0].bool()
            self._count_cache[key] = (int(mask.sum()), int(self.image_mask(inputs)[0][mask].sum()))
        return self._count_cache[key]

    def token_roles(self, input_ids: np.ndarray, image: np.ndarray, text: str, instruction: str) -> np.ndarray:
        """Role of every valid token of one sample (`vislens.store.schema` ROLE_* codes), (n,) uint8.

        ``input_ids`` (n,) and ``image`` (n,) bool are the processor's valid tokens and image
        positions; ``text`` is the formatted prompt (`format_prompt`) and ``instruction`` the prompt
        text before the template. The formatted text is tokenized alone with character offsets;
        its tokens are aligned with the processor's (which expand image placeholders and may insert
        markers); a token whose characters overlap the instruction is ``instruction``, the BOS token
        ``bos``, an image position ``image``, everything else (template words, separators, inserted
        markers, other special tokens) ``template``.
        """
        from difflib import SequenceMatcher

        from vislens.store import schema

        tok = self.tokenizer
        if not getattr(tok, "is_fast", False):
            raise ModelError(
                f"{type(tok).__name__} is a slow tokenizer; vislens needs a fast one (character offsets) to tell "
                "instruction tokens from template tokens: load the checkpoint's tokenizer.json (use_fast=True)"
            )
        add_special = self.special_tokens_kwargs([text]).get("add_special_tokens", True)
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=add_special)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        start, end = _instruction_span(text, instruction, self.image_placeholder)
        bos = tok.bos_token_id
        own = []
        for token, (a, b) in zip(ids, offsets, strict=True):
            if token == bos:
                own.append(schema.ROLE_BOS)
            elif b > a and a < end and b > start:  # covers characters of the instruction
                own.append(schema.ROLE_INSTRUCTION)
            else:
                own.append(schema.ROLE_TEMPLATE)
        roles = np.full(len(input_ids), schema.ROLE_TEMPLATE, dtype=np.uint8)
        matcher = SequenceMatcher(None, [int(i) for i in input_ids], ids, autojunk=False)
        for block in matcher.get_matching_blocks():
            roles[block.a : block.a + block.size] = own[block.b : block.b + block.size]
        roles[np.asarray(image, dtype=bool)] = schema.ROLE_IMAGE
        if instruction_core(instruction, self.image_placeholder) and not (roles == schema.ROLE_INSTRUCTION).any():
            raise ModelError(
                f"no token of the instruction {instruction[:60]!r} was found in the model's input; "
                "the prompt template dropped it (check the family's format_prompt)"
            )
        return roles

    def logits(self, outputs: Any) -> torch.Tensor:
        """The model's own next-token logits (batch, token, vocab) from a `forward`."""
        return outputs.logits

    # ---- forward -------------------------------------------------------------------
    def forward(self, inputs: dict[str, torch.Tensor]) -> Any:
        """Run the model on a batch with hidden states returned."""
        return self.model(**inputs, output_hidden_states=True, use_cache=False)

    def hidden_states(self, outputs: Any) -> tuple[torch.Tensor, ...]:
        """The L + 1 decoder hidden states (last one already final-normed)."""
        return outputs.hidden_states

    # ---- vocabulary ------------------------------------------------------------------
    def vocabulary(self) -> tuple[list[str], np.ndarray]:
        """Each token's text as it reads after other text (leading space kept) and a special mask."""
        tok = self.tokenizer
        size = max(len(tok), self.unembedding.shape[0])
        anchor_id = tok.convert_tokens_to_ids(tok.tokenize("a")[-1]) if tok.tokenize("a") else 0
        anchor = tok.decode([anchor_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        special_ids = set(tok.all_special_ids)
        n = len(tok)
        full = tok.batch_decode(
            [[anchor_id, i] for i in range(n)],
            skip_special_tokens=False,
            clean_up_tokenization_spaces=False,
        )
        texts = [t[len(anchor) :] if t.startswith(anchor) else t for t in full] + [""] * (size - n)
        special = np.ones(size, dtype=bool)
        special[:n] = [i in special_ids for i in range(n)]
        return texts, special

    # ---- ablation: running image prefixes ----
    # What `vislens.ablate` needs to run the language decoder on input embeddings with a cache.
    # LLaVA-shaped defaults; InstructBLIP (query tokens before BOS) overrides `ablation_embeddings`,
    # Qwen2-VL (multimodal rotary positions) overrides `ablation_positions` and `ablated_positions`.
    def ablation_texts(self, prompt: str, caption: str) -> tuple[str, str]:
        """(context, full text): the prompt in the chat template, and it followed by the caption.

        The caption tokens are the tokens of ``full`` beyond those of ``context``; nothing
        follows the caption (no end-of-sequence token).
        """
        context = self.format_prompt(prompt)
        return context, f"{context} {caption.strip()}"

    def ablation_inputs(
        self, full: dict[str, torch.Tensor], context: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """What `ablation_embeddings` embeds: the `encode` outputs of the full text (prompt and caption).

        ``context`` holds those of the prompt alone, for families whose image features read the
        text (InstructBLIP's Q-Former must not see the caption being scored).
        """
        return full

    def ablation_embeddings(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(batch, token, hidden) decoder input embeddings with the image features in place.

        ``inputs`` are `encode` outputs; this is what the model's own forward feeds its decoder.
        """
        base = self.model.model
        embeds = base.get_input_embeddings()(inputs["input_ids"])
        extra = {k: inputs[k] for k in ("image_sizes", "image_grid_thw", "pixel_attention_mask") if k in inputs}
        features = base.get_image_features(pixel_values=inputs["pixel_values"], **extra).pooler_output
        features = torch.cat(list(features), dim=0).to(embeds.device, embeds.dtype)
        mask = self.image_mask(inputs).to(embeds.device)
        if int(mask.sum()) != features.shape[0]:
            raise ModelError(
                f"{int(mask.sum())} image placeholders but {features.shape[0]} image features; the prompt or processor is wrong"
            )
        return embeds.masked_scatter(mask[..., None], features)

    def ablation_positions(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(batch, P, token) int64 rotary positions of the `encode`d inputs: P = 1, ``0, 1, 2, ...``."""
        ids = inputs["input_ids"]
        return torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], 1, -1)

    def ablated_positions(
        self, positions: torch.Tensor, image: torch.Tensor, removed: torch.Tensor, shift: bool
    ) -> torch.Tensor:
        """(setting, P, token) rotary positions of every token of each ablated input.

        ``positions`` (P, token) are those of the full input, ``image`` (token,) bool its image
        tokens, ``removed`` (setting, token) bool the tokens each setting removes. ``shift``
        (``remove`` style): every kept token moves down by the removed tokens before it, as in the
        truly shorter input; else (``block`` style) nothing moves. Removed tokens' entries are unused.
        """
        if not shift:
            return positions.expand(removed.shape[0], -1, -1)
        return positions[None] - removed.long().cumsum(-1)[:, None, :]

    def ablation_cache(self, keys_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> Any:
        """A transformers `DynamicCache`, empty or holding (batch, kv_heads, token, head_dim) keys and values per layer."""
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=keys_values, config=self.text_config)

    def ablation_cache_tensors(self, cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values per decoder layer of a filled cache, (batch, kv_heads, token, head_dim) each."""
        return [(layer.keys, layer.values) for layer in cache.layers]

    def ablation_decode(
        self,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
    ) -> torch.Tensor:
        """Run the language decoder on ``embeds`` (batch, token, hidden); the final-normed last hidden states.

        ``position_ids`` (batch, P, token) come from `ablated_positions` (P = 1 is passed on as
        (batch, token), P > 1 as (P, batch, token), the multimodal rotary layout of Qwen2-VL).
        ``attention_mask`` is a 2D padding mask (batch, cached + token), a 4D additive float mask
        (batch, 1, token, cached + token) used as is, or None (causal); ``cache`` (from
        `ablation_cache`) is extended in place with the new keys and values.
        """
        name = "cache" if "cache" in inspect.signature(self.decoder.forward).parameters else "past_key_values"
        positions = position_ids[:, 0] if position_ids.shape[1] == 1 else position_ids.transpose(0, 1)
        out = self.decoder(
            inputs_embeds=embeds,
            position_ids=positions,
            attention_mask=attention_mask,
            use_cache=cache is not None,
            **{name: cache},
        )
        return out.last_hidden_state

    def ablation_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., vocab) next-token logits of final-normed hidden states (..., hidden)."""
        return self.model.get_output_embeddings()(hidden)
