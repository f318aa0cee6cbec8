from __future__ import annotations

import pytest
import torch

from vislens.kernels import norm_attention, value_gram
from vislens.kernels.norm_attention import reference


def _inputs(dtype: torch.dtype, heads: int = 5):
    """Odd sizes (H = 5 is no power of two), a token with f = 0, large value norms."""
    g = torch.Generator().manual_seed(0)
    attn = torch.softmax(torch.randn(2, heads, 7, 53, generator=g) * 3, dim=-1).to(dtype)
    f = torch.randn(2, 53, heads, 67, generator=g) * 100
    f[1, 4] = 0
    return attn, f


def test_references_agree():
    """a^T G a from the Gram matrices equals the norm of the materialised alpha * f(x)."""
    attn, f = _inputs(torch.float32)
    from_values = reference.norm_attention_from_values(attn, f)
    from_gram = reference.norm_attention(attn, f @ f.transpose(-1, -2))
    for got, want in zip(from_gram, from_values):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_matches_reference(backend, device, assert_close, dtype):
    attn, f = _inputs(dtype)
    gram = f @ f.transpose(-1, -2)
    want_per_head, want_summed = reference.norm_attention_from_values(attn, f)
    per_head, summed = norm_attention(attn.to(device), gram.to(device), backend=backend)
    assert_close(per_head, want_per_head, dtype)
    assert_close(summed, want_summed, dtype)


def test_query_rows_and_no_leading_dims(backend, device, assert_close):
    """Only some query rows (a strided slice), and attn of shape (H, Q, N)."""
    attn, f = _inputs(torch.float32)
    rows = attn[0, :, 2::2]
    want = reference.norm_attention_from_values(rows, f[0])
    got = norm_attention(rows.to(device), (f[0] @ f[0].transpose(-1, -2)).to(device), backend=backend)
    for g, w in zip(got, want):
        assert_close(g, w, torch.float32)


def test_end_to_end_on_a_tiny_llama(tiny_llama, backend, device, assert_close):
    """value_gram + norm_attention reproduce the norms of the layer's own per-source outputs.

    Independently of the kernels: head h of query q moves alpha^h_qj v_{j,kv(h)} from source j,
    and o_proj maps the heads' concatenation to the model space, so the contribution of j to
    q's attention output is c_qj = w_o @ concat_h(alpha^h_qj v_{j,kv(h)}); the c_qj add up to
    the o_proj output the model computed.
    """
    layer = tiny_llama
    heads, tokens, _ = layer.attn.shape
    d = layer.w_o.shape[1] // heads
    v = layer.values.unflatten(-1, (-1, d))  # (N, H_kv, d)
    v = v.repeat_interleave(heads // v.shape[1], dim=1)  # (N, H, d): head h reads kv(h)
    moved = layer.attn.permute(1, 2, 0)[..., None] * v[None]  # (Q, N, H, d)
    contributions = moved.flatten(-2) @ layer.w_o.T  # (Q, N, D)
    torch.testing.assert_close(contributions.sum(1), layer.attn_output, rtol=1e-4, atol=1e-5)
    per_head_moved = torch.stack(
        [moved[:, :, h] @ layer.w_o[:, h * d : (h + 1) * d].T for h in range(heads)]
    )  # (H, Q, N, D)

    gram = value_gram(layer.values.to(device), layer.w_o.to(device), heads, backend=backend)
    per_head, summed = norm_attention(layer.attn.to(device), gram, backend=backend)
    assert_close(summed, contributions.norm(dim=-1), torch.float32)
    assert_close(per_head, per_head_moved.norm(dim=-1), torch.float32)


def test_input_errors():
    attn = torch.rand(2, 4, 3, 5)
    with pytest.raises(ValueError, match="gram must be"):
        norm_attention(attn, torch.rand(2, 5, 4, 3))
    with pytest.raises(ValueError, match="attn must be"):
        norm_attention(attn[0, 0, 0], torch.rand(5, 4, 4))
