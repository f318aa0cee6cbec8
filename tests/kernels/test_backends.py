"""Choosing backends: explicit choices that cannot run say why; only "auto" falls back."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from vislens.errors import BackendUnavailableError
from vislens.kernels import lens_topk, mean_cosine, norm_attention, value_gram
from vislens.kernels._backend import load


def _calls(device: str = "cpu"):
    a = torch.randn(3, 4, device=device)
    attn, gram = torch.rand(2, 3, 5, device=device), torch.rand(5, 2, 2, device=device)
    return {
        "mean_cosine": lambda backend: mean_cosine(a, a, backend=backend),
        "norm_attention": lambda backend: norm_attention(attn, gram, backend=backend),
        "value_gram": lambda backend: value_gram(a, torch.randn(6, 4, device=device), 2, backend=backend),
        "lens_topk": lambda backend: lens_topk(a, torch.randn(7, 4, device=device), 2, backend=backend),
    }


@pytest.mark.parametrize("op", ["mean_cosine", "norm_attention", "value_gram", "lens_topk"])
def test_unknown_backend_is_a_value_error(op):
    with pytest.raises(ValueError, match="backend must be one of"):
        _calls()[op]("cuda")


@pytest.mark.parametrize("op", ["mean_cosine", "norm_attention", "value_gram", "lens_topk"])
def test_triton_on_cpu_without_the_interpreter(op, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU tensors, GPU or not
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        _calls()[op]("triton")
    _calls()[op]("auto")  # falls back to numba or torch


def test_triton_not_installed(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
    with pytest.raises(BackendUnavailableError, match=r"pip install 'vislens\[triton\]'"):
        _calls()["mean_cosine"]("triton")


def test_numba_import_failure_keeps_the_import_error(monkeypatch):
    """An installed but broken numba: the kernel module's import fails on first use."""
    monkeypatch.setitem(sys.modules, "numba", None)  # makes `import numba` raise ImportError
    monkeypatch.delitem(sys.modules, "vislens.kernels.norm_attention.numba", raising=False)
    with pytest.raises(BackendUnavailableError, match="pip install numba") as info:
        load("vislens.kernels.norm_attention", "numba")
    assert isinstance(info.value.__cause__, ImportError)


@pytest.mark.parametrize("op", ["mean_cosine", "norm_attention", "value_gram", "lens_topk"])
def test_device_mismatch_and_auto_fallback(op):
    """numba cannot take non-CPU tensors; "auto" then runs torch (meta tensors: shapes only)."""
    calls = _calls("meta")
    with pytest.raises(BackendUnavailableError, match="CPU tensors"):
        calls[op]("numba")
    with pytest.raises(BackendUnavailableError, match="CUDA tensors"):
        calls[op]("triton")
    result = calls[op]("auto")
    assert (result[0] if isinstance(result, tuple) else result).device.type == "meta"


def test_nothing_optional_is_imported_with_vislens():
    code = (
        "import sys, vislens, vislens.kernels; "
        "sys.exit(any(m.split('.')[0] in ('numba', 'triton', 'llvmlite') for m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
