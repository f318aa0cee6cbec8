"""A tiny, random-init InstructBLIP (Vicuna-style) checkpoint for tests and trials.

Built from configs (no downloads): a tiny vision tower, a tiny Q-Former with a few query
tokens, a Llama decoder, the toy LLaVA's BPE tokenizer for the language model and an offline
BERT-style WordPiece tokenizer for the Q-Former, wrapped in a real `InstructBlipProcessor`.
Norm weights (vision tower, Q-Former, decoder) are random and non-unit (`vislens.toys.norms`).
Saved with ``save_pretrained``, it loads through the same ``from_pretrained(path)`` path as
``Salesforce/instructblip-vicuna-7b``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vislens.toys.norms import randomize_norms
from vislens.toys.shapes import caption_corpus
from vislens.toys.text import build_toy_tokenizer, text_config_kwargs

QFORMER_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass(frozen=True)
class ToyInstructBlipSpec:
    """Sizes of a toy InstructBLIP; ``query_tokens`` is the number of image tokens per image."""

    layers: int = 3
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vocab: int = 512
    image_size: int = 30
    patch_size: int = 6
    vision_hidden: int = 32
    vision_layers: int = 2
    qformer_hidden: int = 32
    qformer_layers: int = 2
    qformer_vocab: int = 256
    query_tokens: int = 8
    qformer_cross_every: int = 2
    """Cross-attention to the image in every n-th Q-Former layer (InstructBLIP's own: 2)."""
    seed: int = 0


def _lm_tokenizer(vocab_size: int):
    """The toy BPE tokenizer without an ``image_token`` attribute, as Vicuna's tokenizer ships.

    `InstructBlipProcessor` then registers ``<image>`` (already in the vocabulary) itself.
    """
    from transformers import PreTrainedTokenizerFast

    trained = build_toy_tokenizer(vocab_size)
    return PreTrainedTokenizerFast(
        tokenizer_object=trained.backend_tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="right",
    )


def build_qformer_tokenizer(vocab_size: int):
    """A lowercasing BERT-style WordPiece tokenizer (``[CLS] text [SEP]``) for the captions and prompts.

    Its vocabulary is chosen, not trained (transformers' WordPiece trainer breaks ties in a
    different order on every call): the special tokens, every character alone and as a
    ``##`` continuation, then whole words by frequency (ties by spelling) up to ``vocab_size``.
    Rarer words split into pieces.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from vislens.extract.prompts import normal_prompts

    normalizer, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    corpus = caption_corpus() + [p.text for p in normal_prompts()]
    counts = Counter(w for text in corpus for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in counts for c in w})
    vocab = [*QFORMER_SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars)]
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    vocab += words[: max(0, vocab_size - len(vocab))]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        padding_side="right",
    )


def toy_instructblip(spec: ToyInstructBlipSpec = ToyInstructBlipSpec()) -> tuple[Any, Any]:
    """A random-init tiny InstructBLIP in eval mode and its processor, in memory."""
    import torch
    from transformers import (
        BlipImageProcessor,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
        LlamaConfig,
    )

    tokenizer = _lm_tokenizer(spec.vocab)
    qformer_tokenizer = build_qformer_tokenizer(spec.qformer_vocab)
    vision = InstructBlipVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=2 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=4,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        initializer_range=0.02,
    )
    qformer = InstructBlipQFormerConfig(
        vocab_size=len(qformer_tokenizer),
        hidden_size=spec.qformer_hidden,
        num_hidden_layers=spec.qformer_layers,
        num_attention_heads=4,
        intermediate_size=2 * spec.qformer_hidden,
        max_position_embeddings=128,
        pad_token_id=qformer_tokenizer.pad_token_id,
        cross_attention_frequency=spec.qformer_cross_every,
    )
    text = LlamaConfig(
        **text_config_kwargs(tokenizer, spec.hidden, spec.intermediate, spec.layers, spec.heads, spec.kv_heads)
    )
    config = InstructBlipConfig(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text,
        num_query_tokens=spec.query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(spec.seed)
    model = InstructBlipForConditionalGeneration(config).eval()
    with torch.no_grad():  # transformers initialises the query tokens to zeros: all image tokens would be equal
        model.query_tokens.normal_(std=config.initializer_range)
    randomize_norms(model, spec.seed)
    image_processor = BlipImageProcessor(size={"height": spec.image_size, "width": spec.image_size})
    processor = InstructBlipProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        qformer_tokenizer=qformer_tokenizer,
        num_query_tokens=spec.query_tokens,
    )
    return model, processor


def build_toy_instructblip(path: Path, spec: ToyInstructBlipSpec = ToyInstructBlipSpec()) -> Path:
    """Write a tiny random-init InstructBLIP checkpoint (model, both tokenizers, processor) to ``path``."""
    model, processor = toy_instructblip(spec)
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    (path / "vislens_toy.json").write_text(json.dumps({"family": "instructblip", **asdict(spec)}))
    return path
