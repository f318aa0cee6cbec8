"""Every kernel at sizes that cross its blocks, with the block sizes of a GPU as well.

Under the Triton interpreter the kernels pick a few large blocks (each program instance costs
milliseconds), so the usual test sizes fit in one block and the code that offsets blocks and
adds partial results never runs on a CPU. ``blocks="gpu"`` makes `vislens.kernels._triton.block`
return the sizes a GPU gets (16 rows, 512 columns, ...), so the interpreter runs the GPU's grid.
Sizes here cross those and the numba kernels' own blocks: rows in fours, tasks of 64 rows and
lanes of 64 elements (mean_cosine), 16 tokens and 256 model dimensions (value_gram).
"""

from __future__ import annotations

import pytest
import torch

import vislens.kernels._triton as triton_blocks
from vislens.kernels import cosine_profile, mean_cosine, norm_attention, value_gram
from vislens.kernels.mean_cosine import reference as cosine_reference
from vislens.kernels.norm_attention import reference as norm_reference
from vislens.kernels.value_gram import reference as gram_reference


@pytest.fixture(params=["interpreted", "gpu"])
def blocks(request, monkeypatch, backend):
    """The Triton block sizes in use (the other backends use their own blocks either way)."""
    if request.param == "gpu":
        monkeypatch.setattr(triton_blocks, "INTERPRET", False)
    return request.param


def test_mean_cosine_across_row_and_column_blocks(backend, device, assert_close, blocks):
    """150 rows (10 GPU blocks of 16; numba: tasks of 64 + 64 + 22 rows, blocks of 4 and single
    rows), 600 columns (2 GPU blocks of 512; numba: 9 sets of 64 lanes and a tail of 24)."""
    g = torch.Generator().manual_seed(4)
    a = torch.randn(2, 150, 600, generator=g) * 20
    b = torch.randn(2, 141, 600, generator=g) + 0.3
    a_mask = torch.rand(2, 150, generator=g) > 0.2
    b_mask = torch.rand(2, 141, generator=g) > 0.2
    on = dict(a_mask=a_mask.to(device), b_mask=b_mask.to(device), backend=backend)
    want = cosine_reference.mean_cosine(a, b, a_mask, b_mask)
    assert_close(mean_cosine(a.to(device), b.to(device), **on), want, torch.float32)
    want = cosine_reference.cosine_profile(a, b, a_mask, b_mask)
    assert_close(cosine_profile(a.to(device), b.to(device), **on), want, torch.float32)
    hidden = a.to(device)  # the analyses' call: one array, two masks
    got = mean_cosine(hidden, hidden, a_mask=on["a_mask"], b_mask=~on["a_mask"], backend=backend)
    assert_close(got, cosine_reference.mean_cosine(a, a, a_mask, ~a_mask), torch.float32)


def test_value_gram_across_token_and_model_blocks(backend, device, assert_close, blocks):
    """70 tokens (numba: 4 blocks of 16 + 6; GPU: 5 blocks of 16), D = 530 (torch: 512 + 18; numba: 256 + 256 + 18;
    GPU: 34 tiles of 16), d = 20 (GPU: 2 tiles)."""
    g = torch.Generator().manual_seed(5)
    values = torch.randn(1, 70, 2 * 20, generator=g) * 3
    w_o = torch.randn(530, 4 * 20, generator=g) / 10
    want = gram_reference.value_gram(values, w_o, 4)
    assert_close(value_gram(values.to(device), w_o.to(device), 4, backend=backend), want, torch.float32)


def test_norm_attention_across_query_and_source_blocks(backend, device, assert_close, blocks):
    """70 query rows (interpreted: 64 + 6; GPU: 5 blocks of 16) and 53 sources (GPU: 4 blocks of 16)."""
    g = torch.Generator().manual_seed(6)
    attn = torch.softmax(torch.randn(2, 5, 70, 53, generator=g) * 2, dim=-1)
    f = torch.randn(2, 53, 5, 24, generator=g) * 10
    want_per_head, want_summed = norm_reference.norm_attention_from_values(attn, f)
    per_head, summed = norm_attention(attn.to(device), (f @ f.transpose(-1, -2)).to(device), backend=backend)
    assert_close(per_head, want_per_head, torch.float32)
    assert_close(summed, want_summed, torch.float32)
