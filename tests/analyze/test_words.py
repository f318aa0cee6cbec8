"""Word rules of the logit lens on hand-built cases with known answers (docs/methods.md, analysis 1)."""

from __future__ import annotations

import numpy as np

from vislens.analyze.logit_lens import _block_scores
from vislens.analyze.words import Vocabulary, reference_words, scores, stop_words, token_word, words
from vislens.store import IMAGE, TEXT

# SentencePiece-style pieces as the store keeps them (text after other text: leading space kept)
VOCAB = ["<s>", " the", " ele", "phant", " Cat", ",", " dog", "s", " on", " grass", "!", " red", " a", "scri", "Red."]
SPECIAL = np.array([True] + [False] * (len(VOCAB) - 1))
V = Vocabulary.build(VOCAB, SPECIAL)


def test_stop_words_are_nltk_english():
    stop = stop_words()
    assert len(stop) == 179
    assert {"the", "a", "on", "is", "s", "t", "don", "shouldn't"} <= stop
    assert "elephant" not in stop and "cat" not in stop


def test_each_token_is_its_own_word():
    assert token_word(" Cat") == "cat"
    assert token_word("Red.") == "red"  # punctuation dropped, lowercased
    assert token_word(",") is None and token_word("!") is None
    assert token_word(" the") is None and token_word("s") is None  # stop words
    assert token_word(" red", special=True) is None


def test_pieces_of_neighbouring_positions_are_never_joined():
    # "▁ele" at one image position and "phant" at the next: two words, never "elephant"
    assert V.decoded_words([2, 3]) == {"ele", "phant"}
    # the review's case: "▁a", "scri", "scri" at three patches is the word "scri" (a: stop word)
    assert V.decoded_words([12, 13, 13]) == {"scri"}
    top = np.array([[[2], [3]]])  # (layer, image token, k)
    np.testing.assert_allclose(scores(top, V, reference_words(["an elephant"])), [[0.0, 0.0, 0.0]])


def test_caption_words():
    assert words("A man's red helmet, on a moped.") == ["man", "red", "helmet", "moped"]
    assert reference_words(["A red cat.", "The cat on grass"]) == {"red", "cat", "grass"}


def test_three_scores_known_answer():
    # one layer, five image tokens: cat, cat, red, "the" (no word), grass ; references {red, cat, elephant}
    top = np.array([[[4], [4], [11], [1], [9]]])
    reference = reference_words(["A red cat", "an elephant"])
    precision, token_precision, recall = scores(top, V, reference)[0]
    assert precision == 2 / 3  # D = {cat, red, grass}: 2 found
    assert token_precision == 3 / 4  # four tokens have a word; cat, cat, red are right
    assert recall == 2 / 3  # red and cat of {red, cat, elephant}


def test_token_precision_counts_tokens_and_precision_counts_words():
    # nine tokens decode "cat" (right), one decodes "grass" (wrong): the two readings differ
    top = np.array([[[4]] * 9 + [[9]]])
    precision, token_precision, _ = scores(top, V, {"cat"})[0]
    assert precision == 1 / 2 and token_precision == 9 / 10


def test_no_decoded_word_gives_zero_precision():
    top = np.array([[[1], [5], [0]]])  # the , <s>
    np.testing.assert_allclose(scores(top, V, {"cat"})[0], [0.0, 0.0, 0.0])


def test_block_scores_use_image_tokens_only_and_union_over_ranks():
    modality = np.array([[TEXT, IMAGE, IMAGE, IMAGE, TEXT]])
    top = np.full((1, 2, 5, 2), -1, dtype=np.int32)
    top[0, :, [0, 4], 0] = 4  # text positions decode "cat": must not count
    top[0, 0, 1:4, 0] = [2, 3, 11]  # ele, phant, red
    top[0, 0, 1:4, 1] = [8, 8, 8]  # " on" x3 -> stop words only
    top[0, 1, 1:4, 0] = [4, 4, 1]  # cat cat the
    top[0, 1, 1:4, 1] = [6, 7, 9]  # dog s grass
    refs = [reference_words(["A red elephant on grass"])]  # red elephant grass
    got = _block_scores(top, modality, np.array([0]), vocabulary=V, references=refs)
    np.testing.assert_allclose(got[0, 0], [1 / 3, 1 / 3, 1 / 3])  # D = {ele, phant, red}
    # layer 1: D = {cat, dog, grass}; tokens: (cat|dog) (cat|s) (the|grass) -> the third hits
    np.testing.assert_allclose(got[0, 1], [1 / 3, 1 / 3, 1 / 3])
    top1 = _block_scores(top[..., :1], modality, np.array([0]), vocabulary=V, references=refs)
    np.testing.assert_allclose(top1[0, 1], [0.0, 0.0, 0.0])  # D = {cat}


# digits, capitals, punctuation and multi-piece words, on both sides (docs/methods.md, analysis 1)
DIGITS = [" 2", "2", "▁1", "0", " Dogs", "DOG", " dogs,", "nd", " t-shirt", "'s", "½"]
DV = Vocabulary.build(DIGITS, np.zeros(len(DIGITS), dtype=bool))


def test_digits_are_words_in_captions_and_in_decoded_tokens():
    assert words("2 dogs and 10 cats on 1 mat, 3.5 km") == ["2", "dogs", "10", "cats", "1", "mat", "3", "5", "km"]
    assert words("The 2nd dog") == ["2nd", "dog"]  # a run of letters and digits is one word
    assert token_word(" 2") == token_word("2") == token_word("▁2") == "2"  # space and the ▁ marker dropped
    assert token_word("0") == "0"  # a digit is never a stop word
    # "2 dogs": the image tokens decode " 2" and " dogs,"; both words are in R
    top = np.array([[[0], [6]]])
    np.testing.assert_allclose(scores(top, DV, reference_words(["2 dogs"])), [[1.0, 1.0, 1.0]])
    np.testing.assert_allclose(scores(np.array([[[1]]]), DV, reference_words(["2 dogs"])), [[1.0, 1.0, 0.5]])


def test_numbers_are_not_normalised_and_digit_pieces_are_never_joined():
    assert reference_words(["two dogs"]) == {"two", "dogs"} and "2" not in reference_words(["two dogs"])
    # a tokenizer that splits numbers into digits ("▁1" "0") never decodes the word "10"
    assert DV.decoded_words([2, 3]) == {"1", "0"}
    np.testing.assert_allclose(scores(np.array([[[2], [3]]]), DV, reference_words(["10 cats"])), [[0.0, 0.0, 0.0]])
    # nor "2nd" from "2" and "nd"
    assert DV.decoded_words([1, 7]) == {"2", "nd"}


def test_capitals_and_punctuation_fold_on_both_sides():
    assert words("A RED Cat, on the Mat!") == ["red", "cat", "mat"]
    assert reference_words(["Dogs."]) == {"dogs"}
    assert token_word(" Dogs") == token_word(" dogs,") == "dogs" and token_word("DOG") == "dog"
    assert token_word("'s") is None  # "s" is a stop word
    assert token_word(" t-shirt") == "tshirt"  # one token, one word: its letters and digits, joined
    assert words("a t-shirt") == ["shirt"]  # "t" is a stop word
    assert token_word("½") == "½"  # letters and digits as Unicode defines them
    top = np.array([[[4], [5], [6], [8]]])  # Dogs, DOG, dogs, -> dogs, dog, dogs ; t-shirt -> tshirt
    precision, token_precision, recall = scores(top, DV, reference_words(["Two DOGS", "A dog."]))[0]
    # D = {dogs, dog, tshirt}, R = {two, dogs, dog}; three of the four tokens are right
    assert (precision, token_precision, recall) == (2 / 3, 3 / 4, 2 / 3)
