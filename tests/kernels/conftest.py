"""Shared fixtures of the kernel tests: backends, tolerances, a tiny Llama, and no skips.

A test that takes `backend` runs once per backend ("triton" under TRITON_INTERPRET=1 on CPU);
`device` is where that backend's inputs live.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

BACKENDS = ("torch", "numba", "triton")
# Kernels accumulate in fp32 from exactly widened inputs; bounds on |got - want| / max|want|.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Every kernel test must run: a skip here is a failure, unless its reason names a CPU feature
    that this machine lacks (e.g. an int8 GEMM path that needs VNNI, refused by its probe)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and "CPU feature missing:" not in str(report.longrepr):
        report.outcome = "failed"
        report.longrepr = f"unexpected skip in tests/kernels: {report.longrepr}"


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", BACKENDS)


@pytest.fixture
def device(backend: str) -> torch.device:
    """Triton's inputs go to the GPU when there is one (else the interpreter runs them)."""
    return torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")


@pytest.fixture
def assert_close():
    return _assert_close


def _assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """got matches want (NaN where want is NaN) to the tolerance of input dtype `dtype`."""
    got = got.cpu()
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan())
    scale = want.nan_to_num().abs().max().clamp(min=1e-30)
    error = ((got - want).nan_to_num().abs().max() / scale).item()
    assert error <= TOLERANCE[dtype], f"relative error {error:.2e} > {TOLERANCE[dtype]:.0e} ({dtype})"


@dataclass
class LayerCapture:
    """One decoder layer's inputs and outputs from a tiny Llama forward pass."""

    hidden_states: torch.Tensor  # (layers + 1, tokens, hidden)
    attn: torch.Tensor  # (heads, tokens, tokens), the layer's attention weights
    values: torch.Tensor  # (tokens, kv_heads * d_head), v_proj output
    attn_output: torch.Tensor  # (tokens, hidden), o_proj output
    w_o: torch.Tensor  # (hidden, heads * d_head)
    n_heads: int


@contextmanager
def _capture_outputs(modules: dict[str, torch.nn.Module]):
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
        for name, module in modules.items()
    ]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def run_tiny_llama(kv_heads: int, layer: int = 1, tokens: int = 11) -> LayerCapture:
    """A 2-layer, 4-head Llama (hidden 64) built from its config, run on random token ids."""
    torch.manual_seed(kv_heads)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).eval()
    attention = model.model.layers[layer].self_attn
    ids = torch.randint(0, config.vocab_size, (1, tokens))
    with torch.no_grad(), _capture_outputs({"v": attention.v_proj, "o": attention.o_proj}) as out:
        result = model(ids, output_hidden_states=True, output_attentions=True)
    return LayerCapture(
        hidden_states=torch.stack(result.hidden_states)[:, 0],
        attn=result.attentions[layer][0],
        values=out["v"][0],
        attn_output=out["o"][0],
        w_o=attention.o_proj.weight,  # a Parameter, as callers pass it
        n_heads=config.num_attention_heads,
    )


@pytest.fixture(scope="session", params=[4, 2], ids=["mha", "gqa"])
def tiny_llama(request) -> LayerCapture:
    return run_tiny_llama(kv_heads=request.param)
