"""What lens_topk takes besides the hidden rows: the final norm, and a prepared unembedding."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

NORM_KINDS = ("rms", "rms_offset", "layer")


@dataclass(frozen=True)
class LensNorm:
    """The decoder's final norm (fields as vislens.extract.adapters.base.NormSpec).

    kind: "rms" (x / rms(x) * weight), "rms_offset" (x / rms(x) * (1 + weight), Gemma) or
    "layer" (LayerNorm, bias optional); weight, bias: (hidden,) float32 tensors.
    """

    kind: str
    eps: float
    weight: torch.Tensor
    bias: torch.Tensor | None = None


def as_norm(norm: Any | None, hidden: int, device: torch.device) -> LensNorm | None:
    """A LensNorm on `device` from any object with kind, eps, weight and bias (e.g. a NormSpec
    holding numpy arrays), checked against the hidden size."""
    if norm is None:
        return None
    kind = str(norm.kind)
    if kind not in NORM_KINDS:
        raise ValueError(f"norm.kind must be one of {NORM_KINDS}, got {kind!r}")

    def tensor(name: str, value: Any) -> torch.Tensor | None:
        if value is None:
            return None
        t = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
        if tuple(t.shape) != (hidden,):
            raise ValueError(f"norm.{name} must have shape ({hidden},) to match the hidden rows, got {tuple(t.shape)}")
        return t.detach().to(device=device, dtype=torch.float32)

    weight = tensor("weight", norm.weight)
    if weight is None:
        raise ValueError("norm.weight is required")
    bias = tensor("bias", getattr(norm, "bias", None))
    if bias is not None and kind != "layer":
        raise ValueError(f"norm.bias is only used by kind='layer', got a bias with kind={kind!r}")
    return LensNorm(kind, float(norm.eps), weight, bias)


class LensUnembedding:
    """An unembedding (vocab, hidden) with what a backend derives from it, computed once.

    The CPU backend quantizes the matrix to int8 and takes norms of its rows (~3 s for 32000 x
    4096 on 2 cores); pass one LensUnembedding to every `lens_topk` call that uses the same matrix
    (a numpy array is wrapped anew on every call, the last torch tensor is remembered). The
    matrix must not change while this object is used.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        if weight.dim() != 2 or weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(
                f"the unembedding must be (vocab, hidden) float16, bfloat16 or float32, got "
                f"{weight.dtype} {tuple(weight.shape)}"
            )
        self.weight = weight.detach()
        self._derived: dict[str, Any] = {}

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    def __getstate__(self) -> dict[str, Any]:
        """Pickles (e.g. to Dask workers) carry the matrix only: what a backend derives from it
        (oneDNN's packed weight cannot be pickled) is built again, once, where it is used."""
        return {"weight": self.weight, "_derived": {}}

    def derived(self, name: str, build: Any) -> Any:
        """build(weight), computed on first use and kept."""
        if name not in self._derived:
            self._derived[name] = build(self.weight)
        return self._derived[name]


_last: tuple[weakref.ref, int, LensUnembedding] | None = None


def prepare_unembedding(unembedding: torch.Tensor | np.ndarray | LensUnembedding) -> LensUnembedding:
    """Wrap an unembedding (vocab, hidden) for repeated `lens_topk` calls (see LensUnembedding).

    The last tensor wrapped is remembered while it lives and its version counter is unchanged, so
    calls with the same tensor share one LensUnembedding; a change made through another view of
    its memory (numpy, .data) is not seen: wrap a new tensor then.
    """
    global _last
    if isinstance(unembedding, LensUnembedding):
        return unembedding
    if isinstance(unembedding, np.ndarray):
        return LensUnembedding(torch.from_numpy(unembedding))
    if _last is not None and _last[0]() is unembedding and _last[1] == unembedding._version:
        return _last[2]
    prepared = LensUnembedding(unembedding)
    _last = (weakref.ref(unembedding), unembedding._version, prepared)
    return prepared
