"""Prompt kinds of the study: normal instructions, noisy token strings, and no prompt."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from vislens.errors import DataError

KINDS = ("normal", "noisy", "empty")
NOISY_LENGTH = (10, 15)


@dataclass(frozen=True)
class Prompt:
    """An instruction before the chat template: ``text`` is empty for the empty kind."""

    kind: str
    id: str
    text: str


def normal_prompts(path: str | Path | None = None) -> list[Prompt]:
    """The study's ten normal prompts, or those of a JSON file ``{"id": "text", ...}``."""
    return prompts_from_file(path, "normal")


def noisy_prompts(path: str | Path) -> list[Prompt]:
    """Fixed noisy prompts (e.g. the study's own strings) from a JSON file ``{"id": "text", ...}`` or a list."""
    return prompts_from_file(path, "noisy")


def prompts_from_file(path: str | Path | None, kind: str) -> list[Prompt]:
    """Prompts of one kind from a JSON file (``{"id": "text"}`` or a list); None: the shipped normal prompts."""
    if path is None:
        raw = resources.files("vislens.data").joinpath("prompts_normal.json").read_text()
        where = "the shipped prompts"
    else:
        where = str(path)
        try:
            raw = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise DataError(f"cannot read prompts file {path}: {exc.strerror}") from None
    try:
        items = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
    if isinstance(items, list):
        items = {str(i): text for i, text in enumerate(items)}
    if not isinstance(items, dict) or not items or not all(isinstance(t, str) and t.strip() for t in items.values()):
        raise DataError(f'{where}: expected {{"id": "prompt text", ...}} with non-empty texts')
    return [Prompt(kind, str(k), v) for k, v in items.items()]


REPLACEMENT_CHARACTER = "\ufffd"
"""What a token that is a partial UTF-8 sequence (a byte piece of a byte-level BPE, a byte-fallback
token) decodes to on its own."""


def drawable(vocabulary: list[str], special: np.ndarray) -> np.ndarray:
    """Boolean over the vocabulary: tokens a noisy prompt may draw.

    Not special, and decoding to itself: a non-empty text without U+FFFD. A byte-level vocabulary
    holds many pieces that are parts of a multi-byte UTF-8 character (Qwen's and Gemma's ``\\xe2``,
    ...); decoded alone each is U+FFFD, so the text drawn would not be the tokens drawn: the model
    would read the tokens of U+FFFD instead. (A token that spells U+FFFD itself is left out too.)
    """
    texts = np.array([bool(t) and REPLACEMENT_CHARACTER not in t for t in vocabulary], dtype=bool)
    return texts & ~np.asarray(special, dtype=bool)


def noisy_prompt(vocabulary: list[str], special: np.ndarray, seed: int, index: int) -> Prompt:
    """A string of 10-15 tokens drawn from the model's vocabulary, reproducible by (seed, index).

    ``vocabulary`` holds each token's text as it appears after other text (leading space kept);
    ``special`` marks special tokens. Only `drawable` tokens are drawn (uniformly, with
    replacement): never a special token, never one that does not decode to itself. Where
    neighbouring pieces happen to spell a special token's text (``<`` ``s`` ``>`` is ``<s>``,
    which a tokenizer reads as BOS), that text is replaced by a space.
    """
    rng = np.random.default_rng([seed, index])
    pool = np.flatnonzero(drawable(vocabulary, special))
    if pool.size == 0:
        raise DataError("the vocabulary has no token that decodes to itself and is not special: no noisy prompt")
    length = int(rng.integers(NOISY_LENGTH[0], NOISY_LENGTH[1] + 1))
    ids = rng.choice(pool, size=length, replace=True)
    text = "".join(vocabulary[i] for i in ids)
    text = without_special_texts(text, [vocabulary[i] for i in np.flatnonzero(special)])
    return Prompt("noisy", f"{seed}-{index}", text.strip())


def without_special_texts(text: str, specials: list[str]) -> str:
    """``text`` with every occurrence of a special token's text replaced by a space (until none is left)."""
    markers = sorted({m.strip() for m in specials if m.strip()}, key=len, reverse=True)
    while True:
        found = [m for m in markers if m in text]
        if not found:
            return text
        for marker in found:
            text = text.replace(marker, " ")
