"""What every toy checkpoint shares on the text side: the Llama-style BPE tokenizer, the LLaVA
chat template and the language model's config keywords."""

from __future__ import annotations

from functools import cache
from typing import Any

from vislens.toys.shapes import caption_corpus

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


@cache
def _trained_bpe(vocab_size: int) -> str:
    """The trained BPE tokenizer as JSON (training is deterministic; cached per process)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from vislens.extract.prompts import normal_prompts

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    corpus = caption_corpus() + [p.text for p in normal_prompts()] + ["USER: ASSISTANT:"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(corpus * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok.to_str()


def build_toy_tokenizer(vocab_size: int):
    """Train a Llama-style BPE tokenizer on shapes-world captions and the study's prompts.

    ``▁`` word markers, punctuation split off, BOS prepended. The corpus is small: a
    ``vocab_size`` beyond ~250 leaves the vocabulary smaller than asked. At 200, every caption
    word is one token and most prompt words split into pieces (``▁depic``, ``te``, ``d``).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_trained_bpe(vocab_size))
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
