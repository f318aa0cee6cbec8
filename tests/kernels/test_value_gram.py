from __future__ import annotations

import pytest
import torch

from vislens.kernels import value_gram
from vislens.kernels.value_gram import reference


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_matches_reference(backend, device, assert_close, dtype, kv_heads):
    """Odd sizes (d_head 12, D 67, N 37), multi-head and grouped-query attention."""
    g = torch.Generator().manual_seed(kv_heads)
    values = (torch.randn(2, 37, kv_heads * 12, generator=g) * 30).to(dtype)
    w_o = (torch.randn(67, 4 * 12, generator=g) / 5).to(dtype)
    values[1, 3] = 0
    want = reference.value_gram(values, w_o, 4)
    assert_close(value_gram(values.to(device), w_o.to(device), 4, backend=backend), want, dtype)


def test_gram_of_the_head_outputs(backend, device, assert_close):
    """G_n[h, h'] = f_h(x_n) . f_h'(x_n), with f from o_proj's columns; values of shape (N, H*d)."""
    values, w_o = torch.randn(9, 4 * 8), torch.randn(20, 4 * 8)
    f = torch.stack([values[:, h * 8 : (h + 1) * 8] @ w_o[:, h * 8 : (h + 1) * 8].T for h in range(4)], 1)
    assert_close(
        value_gram(values.to(device), w_o.to(device), 4, backend=backend), f @ f.transpose(-1, -2), torch.float32
    )


def test_input_errors():
    with pytest.raises(ValueError, match="does not fit"):
        value_gram(torch.randn(5, 24), torch.randn(16, 32), 4)  # d = 8, 24 / 8 = 3 kv heads
    with pytest.raises(ValueError, match="does not fit"):
        value_gram(torch.randn(5, 32), torch.randn(16, 30), 4)
    with pytest.raises(ValueError, match="values must be"):
        value_gram(torch.randn(5, 32), torch.randn(16, 32, 1), 4)
