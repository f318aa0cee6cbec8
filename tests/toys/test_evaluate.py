"""The toys' caption score counts words as a multiset: a word said twice counts twice."""

from __future__ import annotations

import pytest

from vislens.toys.evaluate import word_f1


def test_word_f1_counts_repeated_words_as_often_as_they_occur():
    # got {red: 2, circle: 1}, want {red: 1, circle: 1}: 2 words in common of 3 said, 2 wanted
    assert word_f1("red red circle", ["a red circle"]) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    # a reference that names two red shapes: saying "red" once recalls one of its two
    assert word_f1("red circle", ["red circle and red square"]) == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert word_f1("blue square", ["red circle"]) == 0.0
    assert word_f1("red circle", ["blue square", "a red circle"]) == 1.0  # the best reference counts
