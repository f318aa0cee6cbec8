"""Choosing a kernel backend, and importing the optional ones only when they are used."""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import torch

from vislens.errors import BackendUnavailableError

BACKENDS = ("auto", "triton", "numba", "torch")
_INSTALL = {"numba": "pip install numba", "triton": "pip install 'vislens[triton]'"}


def resolve(backend: str, *tensors: torch.Tensor, cpu_auto: str = "numba") -> str:
    """The backend that will run on `tensors`.

    "auto" picks Triton for CUDA tensors and `cpu_auto` (numba) for CPU tensors, and falls back
    to "torch" when that one cannot run; an explicit choice that cannot run raises
    BackendUnavailableError saying why. An unknown name raises ValueError.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    devices = {t.device.type for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, found {sorted(devices)}")
    device = devices.pop()
    if backend == "auto":
        preferred = "triton" if device == "cuda" else cpu_auto
        return preferred if _why_not(preferred, device) is None else "torch"
    reason = _why_not(backend, device)
    if reason is not None:
        raise BackendUnavailableError(reason)
    return backend


def _why_not(backend: str, device: str) -> str | None:
    """Why `backend` cannot run on tensors of `device`, or None if it can."""
    if backend == "torch":
        return None
    if importlib.util.find_spec(backend) is None:
        return f"backend={backend!r} needs {backend}, which is not installed: {_INSTALL[backend]}"
    if backend == "numba" and device != "cpu":
        return (
            f"backend='numba' runs on CPU tensors, these are on {device}: "
            "move them with .cpu() or use backend='triton' or 'torch'"
        )
    interpreted = device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    if backend == "triton" and device != "cuda" and not interpreted:
        return (
            f"backend='triton' needs CUDA tensors, these are on {device}; set TRITON_INTERPRET=1 "
            "before importing vislens to run Triton kernels on CPU tensors (slow, for testing), "
            "or use backend='numba' or 'torch'"
        )
    return None


def load(package: str, backend: str) -> ModuleType:
    """Import the `backend` ("numba" or "triton") module of the kernel package `package`.

    A failed import of the library itself is re-raised as BackendUnavailableError with an
    install hint, chained to the original ImportError.
    """
    try:
        return importlib.import_module(f"{package}.{backend}")
    except ImportError as err:
        if (err.name or "").split(".")[0] not in (backend, "llvmlite"):
            raise
        raise BackendUnavailableError(
            f"backend={backend!r} could not import {err.name} ({err}): {_INSTALL[backend]}"
        ) from err
