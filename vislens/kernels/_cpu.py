"""The CPU a kernel runs on, in words: its model name and the features its fast paths need."""

from __future__ import annotations

import platform

import torch


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), or what the platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo), or an empty set."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def describe_cpu() -> str:
    """e.g. 'AMD EPYC (avx2, fma; no avx512f, no avx512_vnni, no avx_vnni, no amx_int8)'."""
    flags = cpu_flags()
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
    parts = [name if name in flags else f"no {name}" for name in wanted]
    return f"{cpu_name()} ({', '.join(parts)}; torch {torch.backends.cpu.get_cpu_capability()})"
