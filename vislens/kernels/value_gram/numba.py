"""value_gram on the CPU: a block of tokens per task, a slice of the model dimension at a time.

For each slice of D the block's head outputs f_h(x_n)[slice] are formed as dot products of
value rows with rows of w_o (widened to float32 once per call), and their Gram matrices added
up, so the (N, H, D) head outputs are never held whole.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from vislens.kernels._numba import FASTMATH, as_numpy, to_f32

_BLOCK_TOKENS = 64
_D_SLICE = 256


@njit(fastmath=FASTMATH, cache=True)
def _dot(x, y):
    total = np.float32(0)
    for i in range(x.size):
        total += x[i] * y[i]
    return total


@njit(parallel=True, cache=True)
def _widen(stored):
    """A 2-D fp16/bf16/fp32 array as float32."""
    out = np.empty(stored.shape, np.float32)
    for i in prange(stored.shape[0]):
        for j in range(stored.shape[1]):
            out[i, j] = to_f32(stored[i, j])
    return out


@njit(fastmath=FASTMATH, cache=True)
def _add_gram(f, gram):
    """gram[t] += f[t] f[t]^T for f (T, H, K), gram (T, H, H)."""
    tokens, heads, _ = f.shape
    for t in range(tokens):
        for h in range(heads):
            for h2 in range(h + 1):
                total = _dot(f[t, h], f[t, h2])
                gram[t, h, h2] += total
                if h2 != h:
                    gram[t, h2, h] += total


@njit(fastmath=FASTMATH, cache=True)
def _token_block(values, w_o, n_heads, gram):
    """gram (T, H, H) += the Gram matrices of the T tokens of values (T, H_kv * d); float32."""
    tokens, width = values.shape
    model_dim = w_o.shape[0]
    d = w_o.shape[1] // n_heads
    group = n_heads // (width // d)
    f = np.empty((tokens, n_heads, _D_SLICE), np.float32)
    for k0 in range(0, model_dim, _D_SLICE):
        k1 = min(k0 + _D_SLICE, model_dim)
        for h in range(n_heads):
            c = (h // group) * d
            for k in range(k0, k1):
                w_row = w_o[k, h * d : (h + 1) * d]
                for t in range(tokens):
                    f[t, h, k - k0] = _dot(w_row, values[t, c : c + d])
        _add_gram(f[:, :, : k1 - k0], gram)


@njit(parallel=True, cache=True)
def _value_gram(values, w_o, n_heads, gram):
    batch, n, _ = values.shape
    blocks = -(-n // _BLOCK_TOKENS)
    for job in prange(batch * blocks):
        b, t0 = job // blocks, (job % blocks) * _BLOCK_TOKENS
        t1 = min(t0 + _BLOCK_TOKENS, n)
        _token_block(values[b, t0:t1], w_o, n_heads, gram[b, t0:t1])


def value_gram(values: torch.Tensor, w_o: torch.Tensor, n_heads: int) -> torch.Tensor:
    """values: (B, N, H_kv * d), w_o: (D, H * d), fp16/bf16/fp32 contiguous -> (B, N, H, H) float32."""
    batch, n, width = values.shape
    gram = np.zeros((batch, n, n_heads, n_heads), np.float32)
    _value_gram(
        _widen(as_numpy(values).reshape(batch * n, width)).reshape(batch, n, width),
        _widen(as_numpy(w_o)),
        n_heads,
        gram,
    )
    return torch.from_numpy(gram)
