"""Capture what norm-based attention needs during the model's own forward pass.

vislens registers an attention function with transformers' `AttentionInterface` that
calls the model's own eager attention unchanged and, on the side, keeps the attention
weights of the selected query rows and the Gram matrices of the head-transformed values.
`capture_attention` switches the language decoder to it and always switches back.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from vislens.errors import ModelError
from vislens.extract.adapters.base import Adapter

IMPLEMENTATION = "vislens_capture"
_ACTIVE: ContextVar[AttentionCapture | None] = ContextVar("vislens_capture", default=None)
_registered = False


@dataclass
class AttentionCapture:
    """Per decoder layer: ``weights`` (B, H, Q, N) at ``query_pos`` and ``gram`` (B, N, H, H)."""

    adapter: Adapter
    query_pos: torch.Tensor
    weights: dict[int, torch.Tensor] = field(default_factory=dict)
    gram: dict[int, torch.Tensor] = field(default_factory=dict)

    def record(self, module: torch.nn.Module, weights: torch.Tensor, value: torch.Tensor) -> None:
        """Keep one layer's rows and Gram matrices."""
        from vislens.kernels import value_gram

        layer = int(module.layer_idx)
        if layer in self.adapter.cross_attention_layers:
            return  # attends to image features, not to the sequence: filled with NaN (`fill_cross_attention`)
        rows = self.query_pos.clamp(min=0).to(weights.device)  # (B, Q); -1 rows are dropped later
        batch = torch.arange(weights.shape[0], device=weights.device)[:, None]
        picked = weights[batch, :, rows, :]  # (B, Q, H, N)
        self.weights[layer] = picked.permute(0, 2, 1, 3).to(torch.float16)
        b, kv, n, d = value.shape
        values = value.transpose(1, 2).reshape(b, n, kv * d)
        shape = self.adapter.attention_shape
        self.gram[layer] = value_gram(values, self.adapter.o_proj(layer).weight, shape.n_heads)

    def fill_cross_attention(self) -> None:
        """NaN weights and Gram matrices for the decoder's cross-attention layers (Mllama), shaped as
        a captured self-attention layer's: norm-based attention is not defined there."""
        layers = self.adapter.cross_attention_layers
        if not layers or not self.weights:
            return
        some = next(iter(self.weights))
        for layer in layers:
            self.weights[layer] = torch.full_like(self.weights[some], float("nan"))
            self.gram[layer] = torch.full_like(self.gram[some], float("nan"))


def _attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ModelError(
            f"{type(module).__name__} has no eager attention function, which vislens needs to "
            "capture attention weights; extract with --attention none, or add support in its adapter"
        )
    output, weights = eager(module, query, key, value, attention_mask, **kwargs)
    capture = _ACTIVE.get()
    if capture is not None:
        capture.record(module, weights, value)
    return output, weights


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(IMPLEMENTATION, _attention)
    AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)
    _registered = True


@contextmanager
def capture_attention(adapter: Adapter, query_pos: torch.Tensor) -> Iterator[AttentionCapture]:
    """Capture attention rows ``query_pos`` (B, Q) of every decoder layer during a forward.

    Raises
    ------
    ModelError
        If the decoder does not run eager attention or a layer was not captured.
    """
    _register()
    decoder = adapter.decoder
    before = adapter.text_config._attn_implementation
    if before != "eager":
        raise ModelError(
            f"the decoder runs {before!r} attention; norm-based attention needs eager attention "
            "weights: load the model with attn_implementation='eager' (vislens does this itself)"
        )
    capture = AttentionCapture(adapter, query_pos)
    token = _ACTIVE.set(capture)
    decoder.set_attn_implementation(IMPLEMENTATION)
    try:
        yield capture
    finally:
        decoder.set_attn_implementation(before)
        _ACTIVE.reset(token)
    capture.fill_cross_attention()
    missing = sorted(set(range(len(adapter.layers))) - set(capture.weights))
    if missing:
        raise ModelError(
            f"attention of decoder layers {missing} was not captured: this architecture does not "
            "route attention through transformers' AttentionInterface; use --attention none"
        )
