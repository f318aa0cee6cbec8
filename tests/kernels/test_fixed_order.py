"""The CPU kernels sum in a fixed order: the same bits whatever the thread count, the batch or
padding a row came in, or the CPU (a child process compiles numba for a generic x86-64 CPU, no
AVX, with more threads than cores)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
import torch

from tests.kernels.fixed_order import inputs, results
from vislens.kernels import mean_cosine, value_gram

ROOT = Path(__file__).resolve().parents[2]


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), f"{name}: {np.sum(a[name] != b[name])} elements differ"


@pytest.fixture(scope="module")
def at_two_threads() -> dict[str, np.ndarray]:
    before = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        return results()
    finally:
        numba.set_num_threads(before)


def test_one_thread_gives_the_same_bits(at_two_threads):
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        _same(results(), at_two_threads)
    finally:
        numba.set_num_threads(before)


def test_a_generic_cpu_build_with_three_threads_gives_the_same_bits(at_two_threads, tmp_path):
    """numba compiled for 'generic' x86-64 (SSE2: 4-wide vectors, not AVX2's 8) in a fresh cache,
    torch's CPU kernels at their default level, three threads on two cores: a kernel whose sums
    followed the vector width or the threads would differ here (torch's LayerNorm does: the
    lens's final norm runs in numpy on the CPU)."""
    out = tmp_path / "generic.npz"
    env = {
        **os.environ,
        "NUMBA_CPU_NAME": "generic",
        "ATEN_CPU_CAPABILITY": "default",
        "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache"),
        "NUMBA_NUM_THREADS": "3",
        "OMP_NUM_THREADS": "3",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run(
        [sys.executable, "-m", "tests.kernels.fixed_order", str(out)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    with np.load(out) as child:
        _same(dict(child), at_two_threads)


def test_a_tokens_gram_does_not_depend_on_its_batch_or_padding():
    """value_gram of a sample alone equals its rows in a padded batch of three, bit for bit."""
    x = inputs()
    values, w_o = x["values"], x["w_o"]
    batch = torch.zeros(3, 60, values.shape[-1], dtype=values.dtype)
    batch[0, :45], batch[1, :30], batch[2, :45] = values[0], values[1, :30], values[2]
    together = value_gram(batch, w_o, 4)
    assert torch.equal(value_gram(values[1:2, :30], w_o, 4)[0], together[1, :30])
    assert torch.equal(value_gram(values[0], w_o, 4), together[0, :45])
    assert torch.equal(value_gram(values[2, 17:18], w_o, 4)[0], together[2, 17])  # one token on its own


def test_a_groups_mean_cosine_does_not_depend_on_the_other_groups_or_padding():
    """One layer alone, or with padding rows after its tokens, gives the bits it gives among all."""
    x = inputs()
    h, image = x["hidden"], x["image"]
    every = mean_cosine(h, h, a_mask=image, b_mask=~image)
    padded = torch.cat([h[1], torch.full((77, h.shape[-1]), float("nan"), dtype=h.dtype)])
    mask = torch.cat([image, torch.zeros(77, dtype=torch.bool)])
    alone = mean_cosine(padded, padded, a_mask=mask, b_mask=torch.cat([~image, torch.zeros(77, dtype=torch.bool)]))
    assert alone.item() == every[1].item() and not torch.isnan(alone)
