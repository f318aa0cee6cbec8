"""Word rules of the logit lens on hand-built cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from vislens.analyze.logit_lens import _block_scores
from vislens.analyze.words import decoded_words, precision_recall, reference_words, stop_words, words
from vislens.store import IMAGE, TEXT

VOCAB = ["<s>", " the", " ele", "phant", " Cat", ",", " dog", "s", " on", " grass", "!", " red"]
SPECIAL = np.array([True] + [False] * (len(VOCAB) - 1))


def test_stop_words_are_nltk_english():
    stop = stop_words()
    assert len(stop) == 179
    assert {"the", "a", "on", "is", "s", "t", "don", "shouldn't"} <= stop
    assert "elephant" not in stop and "cat" not in stop


def test_sub_word_pieces_join_and_punctuation_and_stop_words_go():
    ids = [0, 1, 2, 3, 5, 4, 10, 6, 7, 8, 9]  # <s> the ele phant , Cat ! dog s on grass
    assert decoded_words(ids, VOCAB, SPECIAL) == {"elephant", "cat", "dogs", "grass"}


def test_special_tokens_separate_words():
    assert decoded_words([2, 0, 3], VOCAB, SPECIAL) == {"ele", "phant"}


def test_caption_words():
    assert words("A man's red helmet, on a moped.") == ["man", "red", "helmet", "moped"]
    assert reference_words(["A red cat.", "The cat on grass"]) == {"red", "cat", "grass"}


def test_precision_recall_known_answer():
    decoded = {"elephant", "cat", "dogs", "grass"}
    reference = {"red", "cat", "grass"}
    assert precision_recall(decoded, reference) == pytest.approx((2 / 4, 2 / 3))
    assert precision_recall(set(), reference) == (0.0, 0.0)


def test_block_scores_use_image_tokens_in_order_and_union_over_ranks():
    modality = np.array([[TEXT, IMAGE, IMAGE, IMAGE, TEXT]])
    top = np.full((1, 2, 5, 2), -1, dtype=np.int32)
    top[0, 0, 1:4, 0] = [2, 3, 11]  # "ele" "phant" " red" -> elephant red
    top[0, 0, 1:4, 1] = [8, 8, 8]  # " on" x3 -> stop words only
    top[0, 1, 1:4, 0] = [4, 4, 1]  # cat cat the -> cat
    top[0, 1, 1:4, 1] = [6, 7, 9]  # dog s grass -> dogs grass
    refs = [reference_words(["A red elephant on grass"])]  # red elephant grass
    scores = _block_scores(top, modality, np.array([0]), vocab_text=VOCAB, vocab_special=SPECIAL, references=refs)
    np.testing.assert_allclose(scores[0, 0], [2 / 2, 2 / 3])  # D = {elephant, red}
    np.testing.assert_allclose(scores[0, 1], [1 / 3, 1 / 3])  # D = {cat, dogs, grass}
    top1 = _block_scores(
        top[..., :1], modality, np.array([0]), vocab_text=VOCAB, vocab_special=SPECIAL, references=refs
    )
    np.testing.assert_allclose(top1[0, 1], [0.0, 0.0])  # D = {cat}
