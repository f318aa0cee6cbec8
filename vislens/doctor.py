"""`vislens doctor`: what this machine gives vislens, and whether its kernels are right here.

The report names the CPU and its features, the int8 GEMM the exact CPU lens screens with (and
why the others were passed over), torch's and numba's threads, Triton and CUDA; then every
kernel runs on small inputs against its reference, and the fixed-order kernels once more on one
thread, which must give the same bits. Its first line is the one to paste into a bug report.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class Check:
    """One kernel check: what was compared, whether it passed, how long it took."""

    name: str
    passed: bool
    detail: str
    seconds: float


@dataclass
class Report:
    """What `vislens doctor` prints (and writes with --json)."""

    summary: str
    system: dict[str, Any]
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.passed for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary,
            "ok": self.ok,
            "system": self.system,
            "checks": [asdict(c) for c in self.checks],
        }


def _lens_screen() -> dict[str, Any]:
    """The exact CPU lens's screen on this CPU: the path "auto" takes and every probe's verdict."""
    from vislens.kernels.lens_topk import numba as cpu

    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(4096, 256, generator=g) / 16).half()
    prepared = cpu.prepare(weight)
    return {"path": prepared.gemm, "probes": prepared.probes}


def _triton() -> dict[str, Any]:
    spec = importlib.util.find_spec("triton")
    if spec is None:
        return {"installed": False}
    import triton

    return {"installed": True, "version": triton.__version__, "interpret": os.environ.get("TRITON_INTERPRET") == "1"}


def _cuda() -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"available": False, "torch_built_with": torch.version.cuda}
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"available": True, "devices": names, "torch_built_with": torch.version.cuda}


def system() -> dict[str, Any]:
    """The machine as vislens sees it."""
    import numba

    import vislens
    from vislens import runtime
    from vislens.kernels._cpu import describe_cpu

    return {
        "vislens": vislens.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": describe_cpu(),
        "usable_cores": runtime.usable_cores(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "numba": numba.__version__,
        "numba_threads": numba.get_num_threads(),
        "numba_threading_layer": _threading_layer(),
        "lens_screen": _lens_screen(),
        "triton": _triton(),
        "cuda": _cuda(),
    }


def _threading_layer() -> str:
    import numba

    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet: run one
        from vislens.kernels.mean_cosine import mean_cosine

        mean_cosine(torch.ones(2, 4), torch.ones(2, 4), backend="numba")
        return numba.threading_layer()


def _timed(name: str, run: Callable[[], str | None]) -> Check:
    """A check: ``run`` returns None when it passes, or what went wrong."""
    begin = time.perf_counter()
    try:
        problem = run()
    except Exception as exc:  # noqa: BLE001 - a doctor reports every failure, it does not stop at one
        problem = f"{type(exc).__name__}: {exc}"
    return Check(name, problem is None, problem or "ok", time.perf_counter() - begin)


def _lens_check() -> str | None:
    from vislens.kernels import LensNorm, lens_topk
    from vislens.kernels.lens_topk import reference

    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(3000, 96, generator=g) / 4).half()
    weight[[5, 700, 2900]] = weight[11].clone()  # exact ties across the vocabulary
    hidden = torch.randn(48, 96, generator=g) * 3
    hidden[3] = 0  # every logit ties at 0
    norm = LensNorm("rms", 1e-6, torch.rand(96, generator=g) + 0.5)
    want = reference.lens_topk(hidden, weight, 5, norm)
    got = lens_topk(hidden, weight, 5, norm=norm, backend="numba")
    if not (torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])):
        return "the exact CPU lens differs from its reference (ids or values)"
    return None


def _close(got: torch.Tensor, want: torch.Tensor, tolerance: float) -> str | None:
    scale = want.nan_to_num().abs().max().clamp(min=1e-30)
    error = ((got - want).nan_to_num().abs().max() / scale).item()
    return None if error <= tolerance else f"relative error {error:.2e} > {tolerance:.0e}"


def _cosine_check() -> str | None:
    from vislens.kernels import mean_cosine
    from vislens.kernels.mean_cosine import reference

    g = torch.Generator().manual_seed(2)
    h = torch.randn(3, 150, 100, generator=g).half()
    image = torch.arange(150) % 3 == 0
    got = mean_cosine(h, h, a_mask=image, b_mask=~image, backend="numba")
    return _close(got, reference.mean_cosine(h[:, image], h[:, ~image]), 1e-5)


def _gram_and_attention_check() -> str | None:
    from vislens.kernels import norm_attention, value_gram
    from vislens.kernels.norm_attention import reference as na_reference
    from vislens.kernels.value_gram import reference as vg_reference

    g = torch.Generator().manual_seed(3)
    values, w_o = torch.randn(2, 30, 2 * 8, generator=g), torch.randn(40, 4 * 8, generator=g) / 4
    gram = value_gram(values, w_o, 4, backend="numba")
    problem = _close(gram, vg_reference.value_gram(values, w_o, 4), 1e-5)
    if problem:
        return f"value_gram: {problem}"
    attn = torch.softmax(torch.randn(2, 4, 5, 30, generator=g), -1)
    got, want = norm_attention(attn, gram, backend="numba"), na_reference.norm_attention(attn, gram)
    problem = _close(got[1], want[1], 1e-5) or _close(got[0], want[0], 1e-5)
    return f"norm_attention: {problem}" if problem else None


def _decode_check() -> str | None:
    """numba's fp16 and bf16 widening (the CPU's half-precision instruction where it has one)
    equals torch's for every one of the 2^16 bit patterns."""
    from numba import njit

    from vislens.kernels._numba import as_numpy, to_f32

    @njit(cache=False)
    def widen(stored, out):
        for i in range(stored.size):
            out[i] = to_f32(stored[i])

    for dtype in (torch.float16, torch.bfloat16):
        x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
        out = np.empty(x.numel(), np.float32)
        widen(as_numpy(x), out)
        want = x.float().numpy()
        if not np.array_equal(out, want, equal_nan=True):
            return f"{dtype}: {int(np.sum(out != want) - np.sum(np.isnan(want)))} bit patterns widen wrongly"
    return None


def _one_thread_check() -> str | None:
    """The fixed-order kernels on one thread give the bits they give on all of them."""
    import numba

    from vislens.kernels import mean_cosine, value_gram

    g = torch.Generator().manual_seed(4)
    h = torch.randn(2, 400, 130, generator=g).half()
    image = torch.arange(400) % 5 < 3
    values, w_o = torch.randn(1, 50, 64, generator=g).half(), torch.randn(96, 64, generator=g).half()

    def run() -> list[np.ndarray]:
        return [
            mean_cosine(h, h, a_mask=image, b_mask=~image, backend="numba").numpy(),
            value_gram(values, w_o, 4, backend="numba").numpy(),
        ]

    before = numba.get_num_threads()
    many = run()
    numba.set_num_threads(1)
    try:
        one = run()
    finally:
        numba.set_num_threads(before)
    same = all(a.tobytes() == b.tobytes() for a, b in zip(many, one, strict=True))
    return None if same else f"results on 1 thread differ from results on {before}"


CHECKS: dict[str, Callable[[], str | None]] = {
    "fp16 and bf16 widen exactly in numba (all 65536 bit patterns)": _decode_check,
    "lens_topk (exact CPU path) equals its reference": _lens_check,
    "mean_cosine (numba) matches its reference": _cosine_check,
    "value_gram and norm_attention (numba) match their references": _gram_and_attention_check,
    "fixed-order kernels give the same bits on 1 thread": _one_thread_check,
}


def diagnose() -> Report:
    """The machine, then every check."""
    info = system()
    checks = [_timed(name, run) for name, run in CHECKS.items()]
    screen = info["lens_screen"]
    verdict = "all kernel checks passed" if all(c.passed for c in checks) else "KERNEL CHECKS FAILED"
    summary = (
        f"vislens {info['vislens']} on {info['cpu']}, {info['usable_cores']} cores: lens screen "
        f"{screen['path']} (probe passed), torch {info['torch']} {info['torch_threads']} threads, numba "
        f"{info['numba']} {info['numba_threads']} threads ({info['numba_threading_layer']}), "
        f"CUDA {'yes' if info['cuda']['available'] else 'no'}; {verdict}"
    )
    return Report(summary, info, checks)
