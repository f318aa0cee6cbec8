"""``--keep-bits N``: fp16 hidden states rounded to N mantissa bits, half to even, and only them."""

from __future__ import annotations

import numpy as np
import pytest

from tests.store.conftest import extract_config
from vislens.extract import extract
from vislens.store import open_store
from vislens.store.precision import keep_mantissa_bits


def rounded(values: np.ndarray, keep: int) -> np.ndarray:
    """The nearest fp16 value with ``keep`` mantissa bits, ties to even, by float64 arithmetic."""
    x = values.astype(np.float64)
    _, exponent = np.frexp(np.where(x == 0, 1.0, x))  # x = m 2^e with 0.5 <= |m| < 1
    exponent = np.maximum(exponent - 1, -14)  # fp16 exponent; subnormals share the smallest one
    step = np.exp2(exponent - keep)  # the spacing of values with `keep` mantissa bits
    with np.errstate(invalid="ignore", over="ignore"):  # inf and nan are kept as they are below
        out = (np.round(x / step) * step).astype(np.float16)  # np.round: half to even; too large: inf
    return np.where(np.isfinite(values), out, values)


@pytest.mark.parametrize("keep", [1, 3, 7, 9])
def test_every_fp16_value_rounds_half_to_even(keep):
    every = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    got, want = keep_mantissa_bits(every, keep), rounded(every, keep)
    same = (got.view(np.uint16) == want.view(np.uint16)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), f"{every[~same][:5]} -> {got[~same][:5]}, expected {want[~same][:5]}"
    assert (keep_mantissa_bits(every, 10).view(np.uint16) == every.view(np.uint16)).all()


def test_ties_go_to_the_even_neighbour():
    # with 1 mantissa bit the values near 1 are 1, 1.5, 2: 1.25 and 1.75 are ties
    ties = np.array([1.25, 1.75, -1.25, 1.125], dtype=np.float16)
    np.testing.assert_array_equal(keep_mantissa_bits(ties, 1), np.array([1.0, 2.0, -1.0, 1.0], np.float16))


def test_the_store_holds_rounded_hidden_states_and_exact_attention(toy_models, manifest, tmp_path):
    exact, lossy = (str(tmp_path / name) for name in ("exact.zarr", "lossy.zarr"))
    extract(extract_config(toy_models["gqa"], manifest, exact, limit=1))
    extract(extract_config(toy_models["gqa"], manifest, lossy, limit=1, keep_bits=3))
    a, b = open_store(exact), open_store(lossy)
    hidden = a["activations"]["hidden"].values
    np.testing.assert_array_equal(b["activations"]["hidden"].values, keep_mantissa_bits(hidden, 3))
    assert not np.array_equal(b["activations"]["hidden"].values, hidden)
    for name in ("attn", "value_gram"):
        np.testing.assert_array_equal(b["attention"][name].values, a["attention"][name].values)
