"""From decoded tokens and captions to sets of words, and precision/recall between them.

The rules, exactly (so that results are reproducible):

1. Decoded text: the texts of the token ids in position order (``lens/vocab_text``: each
   token's text as it reads after other text, leading space kept), concatenated, so that a
   piece without a leading space continues the previous word; special tokens count as a space.
2. Lowercase; words are the maximal runs of Unicode letters and digits (everything else,
   punctuation, apostrophes and underscores included, separates words).
3. Drop the stop words: NLTK's English list (179 words), shipped in
   ``vislens/data/stopwords_nltk_english.txt``.
4. For one image and layer: D = the set of distinct words decoded from its image tokens, R =
   the set of words of all its reference captions, both after 1-3;
   precision = |D & R| / |D| (0 when D is empty), recall = |D & R| / |R|.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
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
    """Lowercased words of ``text`` without punctuation and stop words (rules 2-3)."""
    stop = stop_words()
    return [w for w in _WORD.findall(text.lower()) if w not in stop]


def decode(ids: Iterable[int], vocab_text: Sequence[str], vocab_special: np.ndarray) -> str:
    """Concatenate token texts in order; special tokens become a space (rule 1)."""
    return "".join(" " if vocab_special[i] else vocab_text[i] for i in ids)


def decoded_words(ids: Iterable[int], vocab_text: Sequence[str], vocab_special: np.ndarray) -> set[str]:
    """The set D of distinct words decoded from a sequence of token ids."""
    return set(words(decode(ids, vocab_text, vocab_special)))


def reference_words(captions: Iterable[str]) -> set[str]:
    """The set R of words of all reference captions."""
    return {w for caption in captions for w in words(caption)}


def precision_recall(decoded: set[str], reference: set[str]) -> tuple[float, float]:
    """(|D & R| / |D| or 0, |D & R| / |R|); recall is NaN when R is empty."""
    hits = len(decoded & reference)
    precision = hits / len(decoded) if decoded else 0.0
    recall = hits / len(reference) if reference else float("nan")
    return precision, recall
