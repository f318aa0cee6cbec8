"""value_gram on the CPU, in a fixed order: each token's Gram matrix is the same bits whatever
the batch it came in, its padding, the thread count or the CPU.

Every sum runs in one order that depends on nothing but the model's shapes: a head output
f_h(x_n)[k] = sum_a v[n, kv(h), a] W_O[k, h d + a] adds its d products from a = 0 upwards, and
G_n[h, h'] = sum_k f_h[k] f_h'[k] adds its D products from k = 0 upwards, each product rounded to
fp32 and added in fp32 (no fused multiply-add, no reassociation: numba compiles these loops
without fast-math flags, so LLVM vectorises them only across independent outputs, tokens or
heads, never along a sum). Tokens are independent, so how they are grouped into tasks and
threads cannot change a bit.

Layout. W_O is transposed once per call to (H, d, D), so that one token block's head outputs are
axpy loops over contiguous D; a block of `_BLOCK_TOKENS` tokens shares each read of W_O, and D
goes a slice of `_D_SLICE` at a time so that the block's head outputs stay in cache; each slice is
transposed to (token, k, head) so that the Gram's inner loop runs over contiguous heads.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from vislens.kernels._numba import as_numpy, to_f32

_BLOCK_TOKENS = 16
_D_SLICE = 256


@njit(parallel=True, cache=True)
def _widen(stored):
    """A 2-D fp16/bf16/fp32 array as float32."""
    out = np.empty(stored.shape, np.float32)
    for i in prange(stored.shape[0]):
        for j in range(stored.shape[1]):
            out[i, j] = to_f32(stored[i, j])
    return out


@njit(parallel=True, cache=True)
def _head_major(w_o, n_heads):
    """w_o (D, H d) as float32 (H, d, D): row (h, a) holds W_O[:, h d + a]."""
    model_dim, width = w_o.shape
    d = width // n_heads
    out = np.empty((n_heads, d, model_dim), np.float32)
    for h in prange(n_heads):
        for k in range(model_dim):
            for a in range(d):
                out[h, a, k] = to_f32(w_o[k, h * d + a])
    return out


@njit(cache=True)
def _head_outputs(values, wt, group, k0, k1, f):
    """f[t, h, :k1-k0] = sum_a values[t, kv(h) d + a] wt[h, a, k0:k1], a from 0 upwards (four
    terms per pass over f: the same order, a quarter of the loads and stores)."""
    tokens = values.shape[0]
    n_heads, d, _ = wt.shape
    width = k1 - k0
    f[:tokens, :, :width] = 0
    quads = d - d % 4
    for h in range(n_heads):
        c = (h // group) * d
        for a in range(0, quads, 4):
            w0, w1, w2, w3 = wt[h, a, k0:k1], wt[h, a + 1, k0:k1], wt[h, a + 2, k0:k1], wt[h, a + 3, k0:k1]
            for t in range(tokens):
                s0, s1, s2, s3 = values[t, c + a], values[t, c + a + 1], values[t, c + a + 2], values[t, c + a + 3]
                row = f[t, h]
                for k in range(width):
                    row[k] = (((row[k] + s0 * w0[k]) + s1 * w1[k]) + s2 * w2[k]) + s3 * w3[k]
        for a in range(quads, d):
            w = wt[h, a, k0:k1]
            for t in range(tokens):
                s = values[t, c + a]
                row = f[t, h]
                for k in range(width):
                    row[k] = row[k] + s * w[k]


@njit(cache=True)
def _add_gram(f, width, tokens, fk, gram):
    """gram[t, h, h'] += sum_k f[t, h, k] f[t, h', k] over the slice, k upwards, for h' <= h
    (four k per pass over the row of gram: the same order)."""
    n_heads = f.shape[1]
    quads = width - width % 4
    for t in range(tokens):
        for k in range(width):
            for h in range(n_heads):
                fk[k, h] = f[t, h, k]
        g = gram[t]
        for k in range(0, quads, 4):
            r0, r1, r2, r3 = fk[k], fk[k + 1], fk[k + 2], fk[k + 3]
            for h in range(n_heads):
                x0, x1, x2, x3 = r0[h], r1[h], r2[h], r3[h]
                target = g[h]
                for h2 in range(h + 1):
                    target[h2] = (((target[h2] + x0 * r0[h2]) + x1 * r1[h2]) + x2 * r2[h2]) + x3 * r3[h2]
        for k in range(quads, width):
            row = fk[k]
            for h in range(n_heads):
                x = row[h]
                target = g[h]
                for h2 in range(h + 1):
                    target[h2] = target[h2] + x * row[h2]


@njit(parallel=True, cache=True)
def _value_gram(values, wt, group, gram):
    """gram (T, H, H) float32 of the tokens values (T, H_kv d) float32; wt (H, d, D) float32."""
    n_tokens = values.shape[0]
    n_heads, _, model_dim = wt.shape
    blocks = -(-n_tokens // _BLOCK_TOKENS)
    for job in prange(blocks):
        t0 = job * _BLOCK_TOKENS
        t1 = min(t0 + _BLOCK_TOKENS, n_tokens)
        f = np.empty((_BLOCK_TOKENS, n_heads, _D_SLICE), np.float32)
        fk = np.empty((_D_SLICE, n_heads), np.float32)
        g = gram[t0:t1]
        g[:] = 0
        for k0 in range(0, model_dim, _D_SLICE):
            k1 = min(k0 + _D_SLICE, model_dim)
            _head_outputs(values[t0:t1], wt, group, k0, k1, f)
            _add_gram(f, k1 - k0, t1 - t0, fk, g)
        for t in range(t1 - t0):  # the upper triangle: products commute, so G is symmetric bit for bit
            for h in range(n_heads):
                for h2 in range(h):
                    g[t, h2, h] = g[t, h, h2]


def value_gram(values: torch.Tensor, w_o: torch.Tensor, n_heads: int) -> torch.Tensor:
    """values: (B, N, H_kv * d), w_o: (D, H * d), fp16/bf16/fp32 contiguous -> (B, N, H, H) float32."""
    batch, n, width = values.shape
    d = w_o.shape[1] // n_heads
    gram = np.empty((batch * n, n_heads, n_heads), np.float32)
    rows = _widen(as_numpy(values).reshape(batch * n, width))
    _value_gram(rows, _head_major(as_numpy(w_o), n_heads), n_heads // (width // d), gram)
    return torch.from_numpy(gram.reshape(batch, n, n_heads, n_heads))
