"""The numba kernels widen fp16 and bf16 bits to float32 exactly, for every bit pattern."""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, types
from numba.extending import intrinsic

from vislens.kernels._numba import as_numpy, half_from_bits, to_f32


@intrinsic
def _half_from_bits(typingctx, bits):
    return types.float32(types.uint16), lambda context, builder, sig, args: half_from_bits(builder, args[0])


@njit
def _widen(stored, out):
    for i in range(stored.size):
        out[i] = to_f32(stored[i])


@njit
def _widen_with_integer_ops(stored, out):
    for i in range(stored.size):
        out[i] = _half_from_bits(stored[i])


def _all_16_bit(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


def test_every_fp16_and_bf16_value():
    for dtype in (torch.float16, torch.bfloat16):
        x = _all_16_bit(dtype)
        out = np.empty(x.numel(), np.float32)
        _widen(as_numpy(x), out)
        torch.testing.assert_close(torch.from_numpy(out), x.float(), rtol=0, atol=0, equal_nan=True)


def test_integer_fp16_decoding_for_cpus_without_f16c():
    x = _all_16_bit(torch.float16)
    out = np.empty(x.numel(), np.float32)
    _widen_with_integer_ops(as_numpy(x), out)
    torch.testing.assert_close(torch.from_numpy(out), x.float(), rtol=0, atol=0, equal_nan=True)
