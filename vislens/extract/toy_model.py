"""The embedded default model: a tiny, random-init LLaVA-1.5-architecture checkpoint.

It is built from configs (no downloads), with an offline BPE tokenizer in the Llama style
(``▁`` word markers, BOS prepended) and a real `LlavaProcessor`, then saved with
``save_pretrained`` so that vislens loads it through the same ``from_pretrained(path)``
path as ``llava-hf/llava-1.5-7b-hf``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vislens.errors import ConfigError
from vislens.extract.datasets.synthetic import caption_corpus

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
TOY_VERSION = 1


@dataclass(frozen=True)
class ToySpec:
    """Sizes of a toy LLaVA; the defaults are the embedded default model.

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


def default_cache_dir() -> Path:
    """Where vislens keeps what it builds: ``$VISLENS_CACHE`` or ``~/.cache/vislens``."""
    return Path(os.environ.get("VISLENS_CACHE", Path.home() / ".cache" / "vislens"))


def _cached(path: Path, build: Callable[[Path], object]) -> Path:
    """Build a checkpoint into ``path`` once (atomically, via a temporary folder) and reuse it."""
    if (path / "config.json").exists() and (path / "vislens_toy.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".building-"))
    try:
        build(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def toy_model_path(spec: ToySpec = ToySpec(), cache_dir: Path | None = None) -> Path:
    """Build the toy checkpoint once and return its folder (reused afterwards)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = "-".join(f"{k}{v}" for k, v in asdict(spec).items())
    return _cached(cache_dir / f"toy-llava-v{TOY_VERSION}-{key}", lambda tmp: build_toy_model(tmp, spec))


TOY_FAMILIES = ("llava", "instructblip", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3")


def toy_checkpoint(family: str = "llava", cache_dir: Path | None = None) -> Path:
    """A tiny random-init checkpoint of any supported family, built once into the cache."""
    if family == "llava":
        return toy_model_path(cache_dir=cache_dir)
    if family not in TOY_FAMILIES:
        raise ConfigError(f"no toy checkpoint for family {family!r}; choose one of {', '.join(TOY_FAMILIES)}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if family == "instructblip":
        from vislens.extract.toy_instructblip import build_toy_instructblip

        build: Callable[[Path], object] = build_toy_instructblip
    else:
        from vislens.extract.toy_families import build_toy_family

        def build(tmp: Path) -> object:
            return build_toy_family(family, tmp)

    return _cached(cache_dir / f"toy-{family}-v{TOY_VERSION}", build)


def build_toy_tokenizer(vocab_size: int):
    """Train a Llama-style BPE tokenizer on the synthetic captions and the study's prompts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from vislens.extract.prompts import normal_prompts

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    corpus = caption_corpus() + [p.text for p in normal_prompts()] + ["USER: ASSISTANT:"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(corpus * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="right",
    )


def text_config_kwargs(
    tokenizer: Any, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int
) -> dict[str, Any]:
    """The language model of every toy checkpoint (Llama-style config keywords), sized by the arguments."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_toy_model(path: Path, spec: ToySpec = ToySpec()) -> Path:
    """Write a tiny LLaVA checkpoint (model, tokenizer, processor) to ``path``."""
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
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    (path / "vislens_toy.json").write_text(json.dumps({"toy_version": TOY_VERSION, **asdict(spec)}))
    return path
