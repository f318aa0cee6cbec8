"""Optional lossy precision: round float16 mantissas so that they compress better."""

from __future__ import annotations

import numpy as np

FP16_MANTISSA_BITS = 10


def keep_mantissa_bits(values: np.ndarray, keep: int) -> np.ndarray:
    """Round float16 ``values`` to ``keep`` mantissa bits (round half to even).

    Zeroing the low ``10 - keep`` bits leaves long runs of equal bytes after shuffling.
    Infinities and NaNs are left as they are.
    """
    values = np.asarray(values)
    if values.dtype != np.float16:
        raise TypeError(f"keep_mantissa_bits works on float16, got {values.dtype}")
    drop = FP16_MANTISSA_BITS - int(keep)
    if drop <= 0:
        return values
    bits = values.view(np.uint16).astype(np.uint32)
    half = (1 << (drop - 1)) - 1
    rounded = (bits + ((bits >> drop) & 1) + half) & ~np.uint32((1 << drop) - 1)
    finite = np.isfinite(values)
    out = np.where(finite, rounded, bits).astype(np.uint16).view(np.float16)
    return out
