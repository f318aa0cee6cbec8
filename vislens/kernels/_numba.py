"""What the numba kernels share: reading fp16, bf16 and fp32 storage as float32.

numba has no 16-bit float types, so 16-bit tensors reach the kernels as 16-bit integer arrays
(`as_numpy`) and `to_f32` widens one element. fp16 uses the CPU's half-to-float instruction
(x86 F16C) where LLVM has it, and otherwise exact integer bit manipulation: without F16C, LLVM
would call a runtime helper that numba does not link (the process crashes).
"""

from __future__ import annotations

import platform

import numba
import numpy as np
import torch
from llvmlite import binding, ir
from numba.core import types
from numba.extending import intrinsic

# Reassociation lets LLVM vectorise sums; NaN and infinity keep their IEEE meaning.
FASTMATH = {"reassoc", "contract"}

_I32, _F32 = ir.IntType(32), ir.FloatType()


def as_numpy(x: torch.Tensor) -> np.ndarray:
    """A CPU tensor's data without a copy: fp16 as uint16, bf16 as int16, fp32 as float32.

    The integer type only tells `to_f32` how to decode (numpy has no bfloat16).
    """
    if x.dtype == torch.float16:
        return x.view(torch.int16).numpy().view(np.uint16)
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy()
    if x.dtype == torch.float32:
        return x.numpy()
    raise TypeError(f"expected a float16, bfloat16 or float32 tensor, got {x.dtype}")


def _hardware_half() -> bool:
    """Whether LLVM widens half to float in one instruction on the CPU numba compiles for."""
    if numba.config.CPU_NAME not in (None, "host"):
        return False
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return x86 and bool(binding.get_host_cpu_features().get("f16c", False))


def half_from_bits(builder: ir.IRBuilder, bits: ir.Value) -> ir.Value:
    """IEEE binary16 bits (i16) to float, exactly, with 32-bit integer operations only."""

    def const(v: int) -> ir.Constant:
        return ir.Constant(_I32, v)

    x = builder.zext(bits, _I32)
    u = builder.shl(builder.and_(x, const(0x7FFF)), const(13))  # exponent and mantissa
    exponent = builder.and_(u, const(0x0F800000))
    u = builder.add(u, const(0x38000000))  # rebias 15 -> 127
    is_special = builder.icmp_unsigned("==", exponent, const(0x0F800000))  # inf or NaN
    u = builder.select(is_special, builder.add(u, const(0x38000000)), u)
    is_small = builder.icmp_unsigned("==", exponent, const(0))  # zero or subnormal
    u = builder.select(is_small, builder.add(u, const(0x00800000)), u)
    f = builder.bitcast(u, _F32)
    f = builder.select(is_small, builder.fsub(f, ir.Constant(_F32, 2.0**-14)), f)
    sign = builder.shl(builder.and_(x, const(0x8000)), const(16))
    return builder.bitcast(builder.or_(builder.bitcast(f, _I32), sign), _F32)


def _half_hardware(builder: ir.IRBuilder, bits: ir.Value) -> ir.Value:
    return builder.fpext(builder.bitcast(bits, ir.HalfType()), _F32)


_HALF = _half_hardware if _hardware_half() else half_from_bits


@intrinsic
def to_f32(typingctx, x):
    """One stored element as float32: uint16 holds fp16 bits, int16 bf16 bits, float32 itself."""
    if x == types.uint16:
        decode = _HALF
    elif x == types.int16:

        def decode(builder, bits):
            return builder.bitcast(builder.shl(builder.zext(bits, _I32), ir.Constant(_I32, 16)), _F32)
    elif x == types.float32:

        def decode(builder, value):
            return value
    else:
        return None

    def codegen(context, builder, signature, args):
        return decode(builder, args[0])

    return types.float32(x), codegen
