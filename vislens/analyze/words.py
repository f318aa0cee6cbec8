"""From decoded token ids and captions to words, and the logit lens's scores (docs/methods.md).

The rules, exactly (so that results are reproducible):

1. **Each image token is its own prediction.** A token id is decoded on its own: its text
   (``lens/vocab_text``), stripped of whitespace, lowercased, with every character that is not
   a letter or digit removed (punctuation, apostrophes, underscores, the ``▁`` marker). What is
   left is the token's word; special tokens, tokens with nothing left, and stop words give no
   word. The texts of neighbouring image positions are never joined: ``▁ele`` at one patch and
   ``phant`` at the next are the words "ele" and "phant", not "elephant".
2. **Reference words** of an image: the words of all its reference captions, each caption
   lowercased and split into maximal runs of letters and digits, stop words dropped.

   Letters and digits are Unicode's (``\\w`` without ``_``), on both sides: ``"2 dogs"`` gives
   the words "2" and "dogs", and a token decoding to ``" 2"`` is the word "2". Numbers are not
   normalised ("2" is not "two"), and, as with any word, the pieces of a number are never joined:
   a tokenizer that splits numbers into digits (Llama's, Qwen2's) never decodes "10" or "2nd".
3. **Stop words**: NLTK's English list (179 words), shipped in
   ``vislens/data/stopwords_nltk_english.txt``.
4. For one sample and layer, with top-k ids per image token, D the set of distinct words of all
   its image tokens' ids and R the set of reference words:

   - ``precision`` = |D & R| / |D| (0 when D is empty): per distinct word;
   - ``token_precision`` = image tokens with a word in R among their top-k words / image tokens
     with at least one word (0 when none): per hidden state, the reading of the study's "a visual
     hidden state decoded correctly if its decoded word matches the ground-truth caption";
   - ``recall`` = |D & R| / |R|.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources

import numpy as np

STOPWORDS = "nltk-english-179"
_WORD = re.compile(r"[^\W_]+")


@cache
def stop_words() -> frozenset[str]:
    """NLTK's English stop words (the shipped 179-word list)."""
    text = resources.files("vislens.data").joinpath("stopwords_nltk_english.txt").read_text()
    return frozenset(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def words(text: str) -> list[str]:
    """Lowercased words of a caption: maximal runs of letters and digits, stop words dropped (rule 2)."""
    stop = stop_words()
    return [w for w in _WORD.findall(text.lower()) if w not in stop]


def token_word(text: str, special: bool = False) -> str | None:
    """The word one token stands for on its own, or None (rule 1)."""
    if special:
        return None
    word = "".join(_WORD.findall(text.strip().lower()))
    if not word or word in stop_words():
        return None
    return word


def reference_words(captions: Iterable[str]) -> set[str]:
    """The set R of words of all reference captions."""
    return {w for caption in captions for w in words(caption)}


@dataclass(frozen=True)
class Vocabulary:
    """Each token id's word as an index into ``words`` (-1: no word), for vectorised scoring."""

    word_of_id: np.ndarray
    words: list[str]

    @classmethod
    def build(cls, vocab_text: Sequence[str], vocab_special: np.ndarray) -> Vocabulary:
        """Rule 1 applied to every token of the vocabulary."""
        index: dict[str, int] = {}
        word_of_id = np.full(len(vocab_text), -1, dtype=np.int64)
        for i, text in enumerate(vocab_text):
            word = token_word(str(text), bool(vocab_special[i]))
            if word is not None:
                word_of_id[i] = index.setdefault(word, len(index))
        return cls(word_of_id, list(index))

    def decoded_words(self, ids: Iterable[int]) -> set[str]:
        """The set D of distinct words of some token ids (ids outside the vocabulary give none)."""
        out = set()
        for i in ids:
            if 0 <= i < self.word_of_id.size and self.word_of_id[i] >= 0:
                out.add(self.words[self.word_of_id[i]])
        return out

    def reference_mask(self, reference: set[str]) -> np.ndarray:
        """Boolean over ``words``: which decodable words are reference words."""
        return np.fromiter((w in reference for w in self.words), dtype=bool, count=len(self.words))


def scores(top: np.ndarray, vocabulary: Vocabulary, reference: set[str]) -> np.ndarray:
    """(layer, image token, k) top-k ids of one sample -> (layer, 3): precision, token_precision, recall.

    Recall is NaN when the reference has no words.
    """
    ids = np.asarray(top, dtype=np.int64)
    inside = (ids >= 0) & (ids < vocabulary.word_of_id.size)
    word = np.where(inside, vocabulary.word_of_id[np.clip(ids, 0, vocabulary.word_of_id.size - 1)], -1)
    in_ref = np.append(vocabulary.reference_mask(reference), False)  # index -1 -> False
    has_word = word >= 0
    hit = in_ref[word] & has_word
    out = np.zeros((ids.shape[0], 3), dtype=np.float64)
    tokens_with_word = has_word.any(-1).sum(-1)
    tokens_hit = hit.any(-1).sum(-1)
    out[:, 1] = np.divide(tokens_hit, tokens_with_word, out=np.zeros(ids.shape[0]), where=tokens_with_word > 0)
    for layer in range(ids.shape[0]):
        distinct = np.unique(word[layer][has_word[layer]])
        hits = int(in_ref[distinct].sum())
        out[layer, 0] = hits / distinct.size if distinct.size else 0.0
        out[layer, 2] = hits / len(reference) if reference else np.nan
    return out
