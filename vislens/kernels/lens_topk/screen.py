"""The int8 GEMM behind the exact CPU lens's screen: which path runs it, the probe that chose it,
and the sentinel rows that check every call.

The screen needs the integer products qx_i . qw_j of int8 codes, exactly (numba.py's bound
assumes them). Paths, in the order "auto" tries them:

- ``onednn``: oneDNN's u8 x s8 matmul (``torch.ops.onednn.qlinear_pointwise``), activation codes
  +-127 sent as u8 with zero point 128 (1..255). Exact where the CPU sums u8 x s8 products in 32
  bits (VNNI's vpdpbusd). Without VNNI (AVX2-only CPUs such as AMD EPYC before Zen 4), oneDNN adds
  pairs of products in 16 bits with saturation (vpmaddubsw): 2 x 255 x 127 > 32767, and the
  products come back wrong, so the probe refuses this path there.
- ``onednn7``: the same op with 7-bit activation codes +-63 and zero point 64 (u8 1..127): a pair
  is at most 2 x 127 x 127 = 32258 < 32767 and cannot saturate on any CPU. The screen's error
  bound is about twice as wide, so a few more candidates are re-scored exactly.
- ``int_mm``: ``torch._int_mm`` (s8 x s8 -> s32), exact; on CPUs without a fast int8 kernel it
  runs a reference loop (~50x slower than an fp32 GEMM, measured on an AMD EPYC), so "auto" never
  picks it; ask for it by name.
- ``fp32``: no int8 screen; every row is screened with an fp32 GEMM (numba.py's fallback). Always
  correct; the path "auto" falls back to.

A path is used only after its probe passes: worst-case operands (every code at its extreme, both
signs, and alternating) on a small matrix, then the sentinel rows against the real unembedding.
Every call then appends the same sentinel rows to its own rows, in the same GEMM, and checks their
products against the exact ones computed once at preparation: a GEMM that returns wrong products
for the shapes it is actually given raises `ScreenFault` (numba.topk then redoes those rows on the
fp32 path and warns once).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vislens.kernels._cpu import cpu_name, describe_cpu

__all__ = ["cpu_name", "describe_cpu"]  # re-exported: the lens's warnings name the CPU

PATHS = ("onednn", "onednn7", "int_mm", "fp32")
AUTO_ORDER = ("onednn", "onednn7")  # then "fp32"


@dataclass(frozen=True)
class Path:
    """How one int8 GEMM path encodes the activation codes."""

    name: str
    levels: int  # activation codes lie in [-levels, levels]
    zero_point: int  # u8 = code + zero_point (0 for int_mm's s8)
    needs: str  # what the CPU (and torch build) must offer for the path to be exact

    @property
    def unsigned(self) -> bool:
        return self.zero_point > 0


PATH = {
    "onednn": Path("onednn", 127, 128, "VNNI (avx512_vnni or avx_vnni: u8 x s8 products summed in 32 bits)"),
    "onednn7": Path("onednn7", 63, 64, "oneDNN's quantized linear op (torch.ops.onednn) in the torch build"),
    "int_mm": Path("int_mm", 127, 0, "an exact torch._int_mm for CPU tensors"),
    "fp32": Path("fp32", 127, 0, "nothing"),
}


class ScreenFault(RuntimeError):
    """The int8 GEMM returned products that are not the exact integers."""


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's quantized linear op."""
    op = getattr(getattr(torch.ops, "onednn", None), "qlinear_pointwise", None)
    return op is not None and torch.backends.mkldnn.is_available()


def _onednn_gemm(codes_u8: torch.Tensor, packed: torch.Tensor, vocab: int, zero_point: int) -> torch.Tensor:
    """(u8 - zero_point) @ qw.T as fp32 (exact where the sums fit fp32's 24 bits: see `rounding`)."""
    ones, zeros = torch.ones(vocab), torch.zeros(vocab, dtype=torch.int64)
    return torch.ops.onednn.qlinear_pointwise(
        codes_u8, 1.0, zero_point, packed, ones, zeros, None, 1.0, 0, torch.float32, "none", [], ""
    )


def pack(path: Path, qw: torch.Tensor) -> torch.Tensor:
    """qw (V, d) int8 in the form `gemm` reads."""
    if path.name.startswith("onednn"):
        return torch.ops.onednn.qlinear_prepack(qw, None)
    return qw


def gemm(path: Path, codes: torch.Tensor, packed: torch.Tensor, vocab: int) -> torch.Tensor:
    """The products of activation codes (R, d) (u8 with the path's zero point, or s8) and qw."""
    if path.name.startswith("onednn"):
        return _onednn_gemm(codes, packed, vocab, path.zero_point)
    if path.name == "int_mm":
        return torch._int_mm(codes, packed.T)
    raise ValueError(f"path {path.name!r} has no int8 GEMM")


def rounding(path: Path, qw_l1: np.ndarray) -> np.ndarray:
    """Per vocabulary row, how far the GEMM's output may be from the exact integer: 0 for int32
    output; for oneDNN's fp32 output, three fp32 roundings of sums of magnitude at most
    (u8 max + zero point) |qw_j|_1 (the u8 products and the zero point's compensation)."""
    if not path.unsigned:
        return np.zeros_like(qw_l1)
    return 2.0**-22 * (path.levels + 2 * path.zero_point) * qw_l1


def sentinel_codes(path: Path, d: int) -> torch.Tensor:
    """Four activation code rows (4, d) int8 that make a faulty int8 GEMM show: every code at
    +levels, every code at -levels, +-levels in a fixed random pattern, and random codes."""
    g = torch.Generator().manual_seed(7)
    level = path.levels
    signs = torch.randint(0, 2, (d,), generator=g, dtype=torch.int8) * 2 - 1
    rows = [
        torch.full((d,), level, dtype=torch.int8),
        torch.full((d,), -level, dtype=torch.int8),
        signs * level,
        torch.randint(-level, level + 1, (d,), generator=g, dtype=torch.int8),
    ]
    return torch.stack(rows)


def encode(path: Path, codes: torch.Tensor) -> torch.Tensor:
    """int8 codes as the GEMM takes them (u8 = code + zero point for oneDNN)."""
    if path.unsigned:
        return (codes.to(torch.int16) + path.zero_point).to(torch.uint8)
    return codes


def exact_products(codes: torch.Tensor, qw: torch.Tensor) -> np.ndarray:
    """codes (R, d) @ qw (V, d).T exactly, as int64 (fp64 holds every such sum exactly)."""
    return (codes.double() @ qw.double().T).round().to(torch.int64).numpy()


@dataclass(frozen=True)
class Sentinels:
    """The sentinel rows of one prepared unembedding and their exact products."""

    codes: torch.Tensor  # (4, d), encoded for the path
    exact: np.ndarray  # (4, V) int64
    tolerance: np.ndarray  # (V,) the GEMM's own rounding


def sentinels(path: Path, qw: torch.Tensor, qw_l1: np.ndarray) -> Sentinels:
    codes = sentinel_codes(path, qw.shape[1])
    return Sentinels(encode(path, codes), exact_products(codes, qw), rounding(path, qw_l1))


def check(out: torch.Tensor, sentinel: Sentinels, path: Path) -> None:
    """Raise ScreenFault unless the GEMM's rows for the sentinels hold their exact products."""
    got = out.numpy().astype(np.float64)
    error = np.abs(got - sentinel.exact)
    if not bool(np.all(error <= sentinel.tolerance)):
        row, col = np.unravel_index(int(np.argmax(error - sentinel.tolerance)), error.shape)
        raise ScreenFault(
            f"the int8 GEMM path {path.name!r} returned {got[row, col]:.0f} for a product whose exact "
            f"value is {sentinel.exact[row, col]} (sentinel row {row}, vocabulary id {col})"
        )


def worst_case_probe(path: Path, d: int) -> str | None:
    """Why `path` cannot give exact products on this CPU (extreme codes on a small matrix), or None."""
    if path.name.startswith("onednn") and not onednn_available():
        return "this torch build has no oneDNN quantized linear op (torch.ops.onednn.qlinear_pointwise)"
    g = torch.Generator().manual_seed(3)
    signs = torch.randint(0, 2, (d,), generator=g, dtype=torch.int8) * 2 - 1
    qw = torch.stack(
        [
            torch.full((d,), 127, dtype=torch.int8),
            torch.full((d,), -127, dtype=torch.int8),
            signs * 127,
            -signs * 127,
            torch.randint(-127, 128, (d,), generator=g, dtype=torch.int8),
        ]
        * 4
    )
    try:
        packed = pack(path, qw)
        probe = sentinels(path, qw, qw.abs().sum(1, dtype=torch.int64).double().numpy())
        for rows in (1, 5, 33):  # oneDNN picks kernels by the number of rows
            codes = torch.cat([probe.codes] * (rows // 4 + 1))[:rows]
            out = gemm(path, codes, packed, qw.shape[0])
            want = Sentinels(codes, np.concatenate([probe.exact] * (rows // 4 + 1))[:rows], probe.tolerance)
            check(out, want, path)
    except ScreenFault as fault:
        return f"it returned wrong products on extreme codes: {fault}"
    except (RuntimeError, NotImplementedError) as err:
        return f"it failed: {err}"
    return None
