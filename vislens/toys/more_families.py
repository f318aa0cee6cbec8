"""Tiny random-init checkpoints of Gemma-3, LLaVA-OneVision, Mllama and SmolVLM.

Built like `vislens.toys.families` (configs, an offline byte-level BPE tokenizer with the
family's special tokens and a chat template shaped like the checkpoints', the family's real
processor, ``save_pretrained``), each with something the older toys lack:

- ``gemma3``: a 3-layer Gemma-3 decoder (``head_dim`` 24 != 64 / 4 heads, ``query_pre_attn_scalar``
  20, a sliding window of 16 tokens on layers 1 and 3, which binds: prompts are ~40 tokens),
  a SigLIP tower on 32-pixel images, 64 patches average-pooled to 16 image tokens (a 4 x 4
  grid), bidirectional attention among them. The tokenizer adds BOS itself, as Gemma's does,
  and the chat template writes it too (so encoding must not add a second one).
- ``llava_onevision``: SigLIP tiles of 12 pixels (2 x 2 features) + Qwen2 decoder, pinpoints up
  to 36 pixels and ``anyres_max_4``: large images' tile features are shrunk by interpolation
  (64x64 -> 24, 96x48 -> 19, 40x80 -> 20, 48x64 -> 20 image tokens).
- ``mllama``: a 3-layer decoder whose layer 2 (index 1) is a gated cross-attention layer, a
  2-tile vision encoder with a global stage (14-pixel tiles of 7-pixel patches); ``<|image|>`` is
  the last token of the tokenizer, beyond ``lm_head``'s vocabulary as in Llama 3.2 Vision.
- ``smolvlm``: Idefics3's shape with SmolVLM's processor (16-pixel tiles of 4 tokens, longest
  edge 48), loaded without its video processor.

Every gate, projector and norm that transformers initialises to zero or one gets random values
(otherwise cross-attention would add nothing and Gemma's image features would all be zero).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vislens.toys.families import _save, _text_config, byte_level_tokenizer

FAMILIES = ("gemma3", "llava_onevision", "mllama", "smolvlm")

GEMMA3_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
GEMMA3_SPECIAL += ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
ONEVISION_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MLLAMA_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>"]
MLLAMA_SPECIAL += ["<|end_header_id|>", "<|eot_id|>", "<|python_tag|>"]
MLLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<|image|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SMOLVLM_SPECIAL = ["<|im_start|>", "<|endoftext|>", "<fake_token_around_image>", "<image>"]
SMOLVLM_SPECIAL += ["<end_of_utterance>", "<global-img>"]
SMOLVLM_SPECIAL += [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _adds_bos(tokenizer: Any, bos: str) -> None:
    """Make the tokenizer put ``bos`` before every text, as Gemma's and Llama 3's do."""
    from tokenizers import processors

    token_id = tokenizer.convert_tokens_to_ids(bos)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, token_id)]
    )


def _randomize(*tensors: torch.Tensor, seed: int, scale: float = 0.5) -> None:
    """Fill parameters that transformers initialises to constants with seeded normal values."""
    generator = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for tensor in tensors:
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * scale)


def _gemma3(path: Path, layers: int, seed: int) -> None:
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    tokenizer = byte_level_tokenizer(
        512,
        GEMMA3_SPECIAL,
        ["user\nmodel\n"],
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    _adds_bos(tokenizer, "<bos>")
    types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    text = _text_config(tokenizer, layers) | dict(
        head_dim=24, query_pre_attn_scalar=20, sliding_window=16, layer_types=types, rope_parameters=None
    )
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=4
    )
    config = Gemma3Config(
        text_config=Gemma3TextConfig(**text),
        vision_config=vision,
        mm_tokens_per_image=16,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.image_token_id,
    )
    processor = Gemma3Processor(
        Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, do_pan_and_scan=False),
        tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=16,
    )
    model = Gemma3ForConditionalGeneration(config)
    _randomize(model.model.multi_modal_projector.mm_input_projection_weight, seed=seed)  # zeros at init
    _save(model, path, seed)
    processor.save_pretrained(path)


def _llava_onevision(path: Path, layers: int, seed: int) -> None:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        Qwen2Config,
        SiglipVisionConfig,
    )

    from vislens.extract.adapters.llava_onevision import image_text_processor

    tokenizer = byte_level_tokenizer(
        512,
        ONEVISION_SPECIAL,
        ["user\nassistant\n"],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )
    tile, patch = 12, 6
    pinpoints = [[12, 24], [24, 12], [24, 24], [12, 36], [36, 12], [24, 36], [36, 24], [36, 36]]
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=tile,
        patch_size=patch,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=Qwen2Config(**_text_config(tokenizer, layers)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_4",
    )
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints
    )
    processor = image_text_processor()(
        image_processor,
        tokenizer,
        num_image_tokens=(tile // patch) ** 2,
        vision_feature_select_strategy="full",
        chat_template=ONEVISION_CHAT_TEMPLATE,
        vision_aspect_ratio="anyres_max_4",
    )
    _save(LlavaOnevisionForConditionalGeneration(config), path, seed)
    processor.save_pretrained(path)
    _name_processor(path, "LlavaOnevisionProcessor")


def _mllama(path: Path, layers: int, seed: int) -> None:
    from transformers import (
        MllamaConfig,
        MllamaForConditionalGeneration,
        MllamaImageProcessorPil,
        MllamaProcessor,
        MllamaTextConfig,
        MllamaVisionConfig,
    )

    tokenizer = byte_level_tokenizer(
        512,
        MLLAMA_SPECIAL,
        ["user\n\nassistant\n\n"],
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
    )
    tokenizer.add_special_tokens({"extra_special_tokens": ["<|image|>"]})  # the last id, beyond lm_head's rows
    _adds_bos(tokenizer, "<|begin_of_text|>")
    image_id = tokenizer.convert_tokens_to_ids("<|image|>")
    text = _text_config(tokenizer, layers) | dict(vocab_size=image_id, cross_attention_layers=[1], rope_parameters=None)
    vision = MllamaVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=4,
        image_size=14,
        patch_size=7,
        max_num_tiles=2,
        intermediate_layers_indices=[0],
        vision_output_dim=64,
        supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
    )
    config = MllamaConfig(vision_config=vision, text_config=MllamaTextConfig(**text), image_token_index=image_id)
    processor = MllamaProcessor(
        MllamaImageProcessorPil(size={"height": 14, "width": 14}, max_image_tiles=2),
        tokenizer,
        chat_template=MLLAMA_CHAT_TEMPLATE,
    )
    model = MllamaForConditionalGeneration(config)
    gates = [p for name, p in model.named_parameters() if name.endswith(("gate", "_gate"))]
    _randomize(*gates, seed=seed, scale=1.0)  # cross-attention and tile gates start at tanh(0) = 0
    _randomize(model.model.vision_model.class_embedding, seed=seed + 1)
    _save(model, path, seed)
    processor.save_pretrained(path)


def _smolvlm(path: Path, layers: int, seed: int) -> None:
    from transformers import LlamaConfig, SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil

    from vislens.extract.adapters.smolvlm import image_text_processor

    tokenizer = byte_level_tokenizer(
        512,
        SMOLVLM_SPECIAL,
        ["User: Assistant:\n\n"],
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>"},
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = SmolVLMConfig(
        vision_config=vision | dict(image_size=16, patch_size=4),
        text_config=LlamaConfig(**_text_config(tokenizer, layers)),
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    image_processor = SmolVLMImageProcessorPil(
        do_image_splitting=True, size={"longest_edge": 48}, max_image_size={"longest_edge": 16}
    )
    processor = image_text_processor()(image_processor, tokenizer, image_seq_len=4, chat_template=SMOLVLM_CHAT_TEMPLATE)
    _save(SmolVLMForConditionalGeneration(config), path, seed)
    processor.save_pretrained(path)
    _name_processor(path, "SmolVLMProcessor")


def _name_processor(path: Path, name: str) -> None:
    """Write transformers' own processor class into the saved config, so the folder reads like a hub checkpoint."""
    saved = path / "processor_config.json"
    doc = json.loads(saved.read_text())
    doc["processor_class"] = name
    saved.write_text(json.dumps(doc, indent=2))


BUILDERS = {"gemma3": _gemma3, "llava_onevision": _llava_onevision, "mllama": _mllama, "smolvlm": _smolvlm}
