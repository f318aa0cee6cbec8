"""Tiny random-init checkpoints of the families with a variable number of image tokens.

``build_toy_family(family, path)`` writes a checkpoint of ``llava_next``, ``qwen2_vl``,
``qwen2_5_vl`` or ``idefics3`` built from configs (no downloads): a 3-layer grouped-query decoder
of width 64, a tiny vision tower (random non-unit norm weights throughout), an offline BPE
tokenizer trained on the synthetic captions with the family's special tokens and chat template, and the family's real processor, all saved with
``save_pretrained`` so that `vislens.extract.adapters.load_adapter` loads them exactly as it loads
the hub checkpoints. Images of different sizes give different numbers of image tokens (tens):

- ``llava_next``: 12-pixel CLIP tiles of 6-pixel patches, pinpoints up to 36 pixels: 64x64 -> 24,
  96x48 -> 14, 40x80 -> 16 tokens (base 2x2 grid, unpadded tiles, row newlines).
- ``qwen2_vl`` / ``qwen2_5_vl``: 4-pixel patches merged 2x2, at most 32x32 pixels: 64x64 -> 16,
  96x48 -> 10, 48x64 -> 12 tokens.
- ``idefics3``: 16-pixel tiles of 4 tokens, longest edge 48: 64x64 -> 3x3 tiles + global = 40,
  96x48 -> 28 tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vislens.errors import ConfigError
from vislens.toys.norms import randomize_norms
from vislens.toys.shapes import caption_corpus
from vislens.toys.text import text_config_kwargs

FAMILIES = ("llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3")
HIDDEN = 64

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
QWEN_SPECIAL += ["<|image_pad|>", "<|video_pad|>"]
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IDEFICS3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<fake_token_around_image>"]
IDEFICS3_SPECIAL += ["<image>", "<end_of_utterance>", "<global-img>"]
IDEFICS3_SPECIAL += [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
IDEFICS3_CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{ message['role'].capitalize() }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _text_config(tokenizer: Any, layers: int) -> dict[str, Any]:
    return text_config_kwargs(tokenizer, HIDDEN, 2 * HIDDEN, layers, heads=4, kv_heads=2)


def _save(model: Any, path: Path, seed: int) -> None:
    """Give the norms random non-unit weights, then save the model in eval mode."""
    randomize_norms(model, seed)
    model.eval().save_pretrained(path)


def byte_level_tokenizer(vocab_size: int, special: list[str], extra_text: list[str], **kwargs: Any) -> Any:
    """A GPT-2-style byte-level BPE trained on the synthetic captions, the study's prompts and ``extra_text``.

    Every token of ``special`` is special; no token is added around the text (the chat templates
    write their own BOS).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from vislens.extract.prompts import normal_prompts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((caption_corpus() + [p.text for p in normal_prompts()] + extra_text) * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="right", **kwargs)
    tokenizer.add_special_tokens({"extra_special_tokens": special})  # all of them special, as in the hub tokenizers
    return tokenizer


def _llava_next(path: Path, layers: int, seed: int) -> None:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    from vislens.toys.text import LLAVA_CHAT_TEMPLATE, build_toy_tokenizer

    tokenizer = build_toy_tokenizer(512)
    tile, patch = 12, 6
    pinpoints = [[12, 24], [24, 12], [24, 24], [12, 36], [36, 12]]
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=tile,
        patch_size=patch,
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=LlamaConfig(**_text_config(tokenizer, layers)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    _save(LlavaNextForConditionalGeneration(config), path, seed)
    processor.save_pretrained(path)


def _qwen(path: Path, layers: int, seed: int, family: str) -> None:
    from transformers import Qwen2VLImageProcessorPil

    from vislens.extract.adapters.qwen2_vl import image_text_processor

    tokenizer = byte_level_tokenizer(
        512,
        QWEN_SPECIAL,
        ["system\nYou are a helpful assistant.\nuser\nassistant\n"],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    ids = {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>") for name in ("image_pad", "video_pad", "vision_start")}
    text = _text_config(tokenizer, layers) | {
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    }
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model

        vision = dict(depth=2, embed_dim=32, hidden_size=HIDDEN, num_heads=2, mlp_ratio=2)
    else:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        vision = dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=HIDDEN, window_size=16
        )
        vision["fullatt_block_indexes"] = [1]
    vision |= dict(patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
    config = Config(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["image_pad"],
        video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"],
    )
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=16 * 16, max_pixels=32 * 32, patch_size=4, merge_size=2, temporal_patch_size=2
    )
    processor = image_text_processor()(image_processor, tokenizer, chat_template=QWEN_CHAT_TEMPLATE)
    _save(Model(config), path, seed)
    processor.save_pretrained(path)
    # the folder then reads like a hub checkpoint: transformers' own processor class
    saved = path / "processor_config.json"
    doc = json.loads(saved.read_text())
    doc["processor_class"] = "Qwen2VLProcessor" if family == "qwen2_vl" else "Qwen2_5_VLProcessor"
    saved.write_text(json.dumps(doc, indent=2))


def _idefics3(path: Path, layers: int, seed: int) -> None:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        LlamaConfig,
    )

    tokenizer = byte_level_tokenizer(
        512,
        IDEFICS3_SPECIAL,
        ["User: Assistant:\n\n"],
        bos_token="<|begin_of_text|>",
        eos_token="<end_of_utterance>",
        pad_token="<|finetune_right_pad_id|>",
        extra_special_tokens={"image_token": "<image>"},
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = Idefics3Config(
        vision_config=vision | dict(image_size=16, patch_size=4),
        text_config=LlamaConfig(**_text_config(tokenizer, layers)),
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=True, size={"longest_edge": 48}, max_image_size={"longest_edge": 16}
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4, chat_template=IDEFICS3_CHAT_TEMPLATE
    )
    _save(Idefics3ForConditionalGeneration(config), path, seed)
    processor.save_pretrained(path)


def build_toy_family(family: str, path: str | Path, *, layers: int = 3, seed: int = 0) -> Path:
    """Write a tiny random-init checkpoint of ``family`` (one of `FAMILIES` or
    `vislens.toys.more_families.FAMILIES`) to ``path``; return it.

    Raises
    ------
    ConfigError
        For a family without a toy builder.
    """
    import torch

    from vislens.toys.more_families import BUILDERS

    if family not in FAMILIES and family not in BUILDERS:
        choices = ", ".join(FAMILIES + tuple(BUILDERS))
        raise ConfigError(f"no toy checkpoint for family {family!r}; choose one of {choices}")
    path = Path(path)
    torch.manual_seed(seed)
    if family in BUILDERS:
        BUILDERS[family](path, layers, seed)
    elif family == "llava_next":
        _llava_next(path, layers, seed)
    elif family == "idefics3":
        _idefics3(path, layers, seed)
    else:
        _qwen(path, layers, seed, family)
    (path / "vislens_toy.json").write_text(json.dumps({"family": family, "layers": layers, "seed": seed}))
    return path
