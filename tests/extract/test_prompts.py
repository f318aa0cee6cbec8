"""Noisy prompts: random strings of the model's own tokens, never its special tokens, never pieces that do not decode to themselves."""

from __future__ import annotations

import numpy as np

from vislens.extract.adapters import load_adapter
from vislens.extract.prompts import NOISY_LENGTH, drawable, noisy_prompt


def test_noisy_prompts_never_draw_special_tokens():
    """Half the vocabulary special: 200 prompts of 10-15 draws would hit one almost surely. Every
    draw is one word here, so a prompt of fewer than 10 words drew a special token."""
    size = 64
    special = np.arange(size) % 2 == 0
    vocabulary = [f"<s{i}>" if special[i] else f" w{i}" for i in range(size)]
    lengths = set()
    for index in range(200):
        prompt = noisy_prompt(vocabulary, special, seed=3, index=index)
        words = prompt.text.split()
        assert "<" not in prompt.text, prompt.text
        assert all(int(w[1:]) % 2 == 1 for w in words)
        lengths.add(len(words))
        assert prompt == noisy_prompt(vocabulary, special, seed=3, index=index)  # reproducible
    assert lengths == set(range(NOISY_LENGTH[0], NOISY_LENGTH[1] + 1))


def test_pieces_that_spell_a_special_token_are_removed():
    """``<`` ``s`` ``>`` are ordinary pieces, ``<s>`` and ``<image>`` special: the drawn text must not
    spell them, or the tokenizer reads a BOS or an image placeholder in the noise."""
    vocabulary = ["<", "s", ">", "<s>", "<image>", "image", ""]
    special = np.array([False, False, False, True, True, False, True])
    spelled = 0
    for index in range(100):
        raw = "".join(vocabulary[i] for i in np.random.default_rng([0, index]).choice(3, 15))
        text = noisy_prompt(vocabulary, special, seed=0, index=index).text
        spelled += "<s>" in raw or "<image>" in raw
        assert "<s>" not in text and "<image>" not in text, text
    assert spelled > 10  # the pieces do spell them often


def test_noisy_prompts_of_a_real_tokenizer_hold_only_the_templates_special_tokens(toy_models):
    """The toy tokenizer's vocabulary (5 special tokens of 512): BOS, EOS, pad, unk and <image>
    never come from the noise; the formatted prompt holds exactly the template's BOS and image."""
    adapter = load_adapter(str(toy_models["mha"])).adapter
    tok = adapter.tokenizer
    texts, special = adapter.vocabulary()
    special_ids = set(tok.all_special_ids)
    assert special_ids <= set(np.flatnonzero(special)) and adapter.image_token_id in special_ids
    empty = tok(adapter.format_prompt(""), add_special_tokens=True)["input_ids"]
    template = sorted(i for i in empty if i in special_ids)
    for index in range(100):
        prompt = noisy_prompt(texts, special, seed=0, index=index)
        noise = tok(prompt.text, add_special_tokens=False)["input_ids"]
        assert not special_ids & set(noise), (prompt.text, sorted(special_ids & set(noise)))
        ids = tok(adapter.format_prompt(prompt.text), add_special_tokens=True)["input_ids"]
        assert sorted(i for i in ids if i in special_ids) == template


def test_noisy_prompts_draw_only_tokens_that_decode_to_themselves():
    """Tokens whose text is U+FFFD (a partial UTF-8 piece decoded alone) or empty are never drawn."""
    size = 60
    vocabulary = [f" w{i}" if i % 3 == 0 else "\ufffd" if i % 3 == 1 else "" for i in range(size)]
    special = np.zeros(size, dtype=bool)
    np.testing.assert_array_equal(drawable(vocabulary, special), np.arange(size) % 3 == 0)
    for index in range(100):
        text = noisy_prompt(vocabulary, special, seed=1, index=index).text
        assert "\ufffd" not in text and NOISY_LENGTH[0] <= len(text.split()) <= NOISY_LENGTH[1], text


def test_noisy_prompts_of_a_byte_level_tokenizer_are_the_tokens_drawn(tmp_path):
    """Qwen2-VL's toy tokenizer is a GPT-2-style byte-level BPE: 128 of its pieces are single bytes
    of multi-byte UTF-8 characters, each decoding alone to U+FFFD. The noisy prompts hold none of
    them: their text re-tokenises and decodes back to itself, with no replacement character."""
    from vislens.toys.families import build_toy_family

    adapter = load_adapter(str(build_toy_family("qwen2_vl", tmp_path / "qwen", layers=1))).adapter
    tok = adapter.tokenizer
    texts, special = adapter.vocabulary()
    partial = [i for i, t in enumerate(texts) if "\ufffd" in t and not special[i]]
    assert len(partial) >= 100  # the old rule (any non-special token) drew one in almost every prompt
    assert not drawable(texts, special)[partial].any()
    for index in range(100):
        text = noisy_prompt(texts, special, seed=0, index=index).text
        assert "\ufffd" not in text, text
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert all("\ufffd" not in tok.decode([i]) for i in ids), text
