"""Settings: parsing, defaults and range checks."""

from __future__ import annotations

import numpy as np
import pytest

from vislens.ablate import AblateConfig
from vislens.ablate.settings import (
    masking_settings,
    parse_intervals,
    parse_ks,
    tile_intervals,
    truncation_settings,
)
from vislens.errors import ConfigError


def test_parse_ks_and_intervals():
    assert parse_ks("1-3, 8,576") == (1, 2, 3, 8, 576)
    assert parse_intervals("0:8,8:16") == ((0, 8), (8, 16))
    assert tile_intervals(10, 4) == ((0, 4), (4, 8), (8, 10))
    with pytest.raises(ConfigError, match="ranges like"):
        parse_ks("1-x")
    with pytest.raises(ConfigError, match="START:STOP"):
        parse_intervals("3-5")


def test_default_settings_cover_every_k_and_every_token():
    trunc = truncation_settings(6)
    np.testing.assert_array_equal(trunc.k, [1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(trunc.stop, [6] * 6)
    assert trunc.shift and trunc.mode == "truncate"
    mask = masking_settings(3)
    np.testing.assert_array_equal(mask.start, [0, 1, 2])
    np.testing.assert_array_equal(mask.stop, [1, 2, 3])
    assert mask.style == "block" and not mask.shift
    assert masking_settings(3, ((0, 2),), "remove").shift
    np.testing.assert_array_equal(truncation_settings(6, (4, 1, 4, 0)).k, [0, 1, 4])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: truncation_settings(6, (7,)), "out of range"),
        (lambda: masking_settings(6, ((3, 3),)), "empty or out of range"),
        (lambda: masking_settings(6, ((4, 7),)), "empty or out of range"),
        (lambda: masking_settings(6, None, "hide"), "mask-style"),
        (lambda: AblateConfig("m", "d", "o", mode="prune"), "mode must be one of"),
        (lambda: AblateConfig("m", "d", "o", mode="truncate", intervals=((0, 1),)), "apply to --mode mask"),
        (lambda: AblateConfig("m", "d", "o", mode="mask", ks=(1,)), "applies to --mode truncate"),
        (lambda: AblateConfig("m", "d", "o", batch_size=0), "at least 1"),
    ],
)
def test_bad_settings_are_refused_with_the_fix(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_inputs_with_fewer_image_tokens_run_the_settings_that_fit():
    fits, start, stop = truncation_settings(6).for_input(4)
    np.testing.assert_array_equal(fits, [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(start, [1, 2, 3, 4])
    np.testing.assert_array_equal(stop, [4, 4, 4, 4])  # truncation removes [k, n) of this input
    fits, start, stop = masking_settings(6, ((0, 2), (3, 5), (4, 6))).for_input(5)
    np.testing.assert_array_equal(fits, [1, 1, 0])
    np.testing.assert_array_equal(np.stack([start, stop]), [[0, 3], [2, 5]])
