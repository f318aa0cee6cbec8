"""lens_topk's vocabulary and row tiles: every backend over vocabularies that span several tiles,
including the torch backend's default 8192-id tile (a real vocabulary is 32000)."""

from __future__ import annotations

import pytest
import torch

from vislens.kernels import lens_topk
from vislens.kernels.lens_topk import eager, reference


def _data(rows: int, d: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, d, generator=g), torch.randn(vocab, d, generator=g)


@pytest.mark.parametrize("vocab_block,row_block", [(7, 3), (50, 4096), (64, 5)])
def test_eager_tiles_equal_one_topk(vocab_block, row_block):
    x, w = _data(11, 16, 200)
    values, ids = eager.lens_topk(x, w, 4, vocab_block=vocab_block, row_block=row_block)
    expected = (x @ w.T).topk(4, dim=-1)
    torch.testing.assert_close(values, expected.values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ids, expected.indices)


@pytest.mark.parametrize("which", ["torch", "numba"])
def test_a_vocabulary_larger_than_the_default_tile(which):
    """9000 ids: past the torch backend's first 8192-id tile; the winners are planted beyond it."""
    x, w = _data(6, 8, 9000, seed=1)
    w[8500:8506] = x * 10  # row i's best id is 8500 + i
    _, ids = lens_topk(x, w, 2, backend=which)
    assert ids[:, 0].tolist() == list(range(8500, 8506))
    _, ref_ids = reference.lens_topk(x, w, 2)
    torch.testing.assert_close(ids, ref_ids)
