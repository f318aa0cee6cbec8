from __future__ import annotations

import math

import pytest
import torch

from vislens.kernels import cosine_profile, mean_cosine
from vislens.kernels.mean_cosine import reference


def _inputs(dtype: torch.dtype):
    """Odd sizes, leading dims that broadcast, large fp16 norms, exact zero rows, masks."""
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(2, 3, 37, 67, generator=g) * 1e3).to(dtype)  # |a_i|^2 ~ 7e7 > fp16 max
    b = (torch.randn(3, 53, 67, generator=g) + 0.5).to(dtype)
    a[0, 1, 5] = 0
    b[2, 7] = 0
    a_mask = torch.rand(2, 3, 37, generator=g) > 0.3
    b_mask = torch.rand(3, 53, generator=g) > 0.3
    b_mask[1] = False  # no valid row: NaN
    return a, b, a_mask, b_mask


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_matches_reference(backend, device, assert_close, dtype):
    a, b, a_mask, b_mask = _inputs(dtype)
    args = (a.to(device), b.to(device))
    masks = {"a_mask": a_mask.to(device), "b_mask": b_mask.to(device)}
    assert_close(mean_cosine(*args, backend=backend), reference.mean_cosine(a, b), dtype)
    assert_close(mean_cosine(*args, **masks, backend=backend), reference.mean_cosine(a, b, a_mask, b_mask), dtype)
    assert_close(cosine_profile(*args, backend=backend), reference.cosine_profile(a, b), dtype)
    assert_close(cosine_profile(*args, **masks, backend=backend), reference.cosine_profile(a, b, a_mask, b_mask), dtype)


def test_strided_views(backend, device, assert_close):
    """Token slices of a (layer, token, hidden) array, read in place, and a non-unit last stride."""
    hidden = torch.randn(5, 40, 96)
    image, text = hidden[:, 3:29], hidden[:, 29:]
    on = hidden.to(device)
    assert_close(
        mean_cosine(on[:, 3:29], on[:, 29:], backend=backend), reference.mean_cosine(image, text), torch.float32
    )
    assert_close(
        cosine_profile(on[:, 3:29, ::2], on[:, 29:, ::2], backend=backend),
        reference.cosine_profile(image[..., ::2], text[..., ::2]),
        torch.float32,
    )


def test_zero_rows_count_in_the_mean(backend, device):
    a = torch.tensor([[3.0, 4.0], [0.0, 0.0]], device=device)
    b = torch.tensor([[1.0, 0.0]], device=device)
    assert mean_cosine(a, b, backend=backend).item() == pytest.approx(0.3)
    assert cosine_profile(a, b, backend=backend).tolist() == pytest.approx([0.6, 0.0])


def test_no_valid_rows_gives_nan(backend, device):
    a, b = torch.randn(2, 4, 8, device=device), torch.randn(2, 5, 8, device=device)
    a_mask = torch.tensor([[True] * 4, [False] * 4], device=device)
    result = mean_cosine(a, b, a_mask=a_mask, backend=backend).cpu()
    assert not math.isnan(result[0]) and math.isnan(result[1])
    assert cosine_profile(a, b, a_mask=a_mask, backend=backend).cpu()[1].isnan().all()
    assert mean_cosine(a[:, :0], b, backend=backend).isnan().all()


def test_one_call_serves_a_batch(backend, device):
    """(sample, layer) leading dims in one call equal one call per (sample, layer)."""
    hidden = torch.randn(3, 4, 30, 64, dtype=torch.float16).to(device)
    batched = mean_cosine(hidden[..., :20, :], hidden[..., 20:, :], backend=backend).cpu()
    for s in range(3):
        for layer in range(4):
            one = mean_cosine(hidden[s, layer, :20], hidden[s, layer, 20:], backend=backend).cpu()
            assert batched[s, layer].item() == pytest.approx(one.item(), abs=1e-6)


def test_real_hidden_states(tiny_llama, backend, device, assert_close):
    """The first 6 tokens (as if image) against the rest, at every layer of a tiny Llama."""
    hidden = tiny_llama.hidden_states
    image, text = hidden[:, :6], hidden[:, 6:]
    assert_close(
        mean_cosine(image.to(device), text.to(device), backend=backend),
        reference.mean_cosine(image, text),
        torch.float32,
    )
    assert_close(
        cosine_profile(text.to(device), image.to(device), backend=backend),
        reference.cosine_profile(text, image),
        torch.float32,
    )


def test_input_errors():
    with pytest.raises(ValueError, match="hidden size"):
        mean_cosine(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="broadcast"):
        mean_cosine(torch.randn(2, 3, 4), torch.randn(3, 3, 4))
    with pytest.raises(ValueError, match="a_mask"):
        mean_cosine(torch.randn(3, 4), torch.randn(3, 4), a_mask=torch.ones(3))
    with pytest.raises(TypeError, match="float16"):
        mean_cosine(torch.ones(3, 4, dtype=torch.int32), torch.randn(3, 4))


def test_one_array_under_two_masks(backend, device, assert_close):
    """The analyses' call: image vs text rows of one (layer, token, hidden) array, picked by masks
    (one kernel pass over both row sets), against the reference on the gathered rows."""
    g = torch.Generator().manual_seed(1)
    hidden = (torch.randn(7, 45, 67, generator=g) * 30).to(torch.float16)
    image = torch.zeros(7, 45, dtype=torch.bool)
    image[:, 3:38] = True
    text = ~image
    text[:, 44] = False  # padding
    on = hidden.to(device)
    got = mean_cosine(on, on, a_mask=image.to(device), b_mask=text.to(device), backend=backend)
    expected = reference.mean_cosine(hidden[:, 3:38], torch.cat([hidden[:, :3], hidden[:, 38:44]], dim=1))
    assert_close(got, expected, torch.float16)
