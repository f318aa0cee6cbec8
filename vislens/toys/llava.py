"""A tiny, random-init LLaVA-1.5-architecture checkpoint.

It is built from configs (no downloads), with an offline BPE tokenizer in the Llama style
(``▁`` word markers, BOS prepended) and a real `LlavaProcessor`, then saved with
``save_pretrained`` so that vislens loads it through the same ``from_pretrained(path)``
path as ``llava-hf/llava-1.5-7b-hf``. Norm weights are random and non-unit
(`vislens.toys.norms`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vislens.toys.norms import randomize_norms
from vislens.toys.text import LLAVA_CHAT_TEMPLATE, build_toy_tokenizer, text_config_kwargs

TOY_VERSION = 3
"""Bumped whenever what a builder writes changes, so that cached builds are not reused."""


@dataclass(frozen=True)
class ToySpec:
    """Sizes of a toy LLaVA.

    ``image_size / patch_size`` squared is the number of image tokens (CLS dropped).
    """

    layers: int = 6
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vocab: int = 512
    image_size: int = 30
    patch_size: int = 6
    vision_hidden: int = 32
    vision_layers: int = 2
    seed: int = 0

    @property
    def n_image_tokens(self) -> int:
        """Image tokens per image."""
        return (self.image_size // self.patch_size) ** 2


def toy_llava(spec: ToySpec = ToySpec()) -> tuple[Any, Any]:
    """A random-init tiny LLaVA in eval mode and its processor, in memory."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = build_toy_tokenizer(spec.vocab)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=2 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=4,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
    )
    text = LlamaConfig(
        **text_config_kwargs(tokenizer, spec.hidden, spec.intermediate, spec.layers, spec.heads, spec.kv_heads)
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config).eval()
    randomize_norms(model, spec.seed)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return model, processor


def build_toy_model(path: Path, spec: ToySpec = ToySpec()) -> Path:
    """Write a tiny random-init LLaVA checkpoint (model, tokenizer, processor) to ``path``."""
    model, processor = toy_llava(spec)
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    (path / "vislens_toy.json").write_text(json.dumps({"toy_version": TOY_VERSION, **asdict(spec)}))
    return path
