"""Whether the model's last hidden state already carries the final norm, measured, not assumed.

transformers' Llama-family decoders return ``hidden_states[-1]`` after the final norm; other
decoders need not. The logit lens must apply the norm exactly once, so extraction compares
``lm_head(h_L)`` and ``lm_head(norm(h_L))`` with the model's own logits on one sample and
records which one matches (``activations/layer`` attribute ``final_norm_applied_to_last``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from vislens.errors import ModelError

log = logging.getLogger("vislens.extract")


def tolerance(dtype: torch.dtype) -> float:
    """Largest relative logit error (max |diff| / max |logit|) accepted as a match for a model dtype."""
    return 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2


@dataclass(frozen=True)
class FinalNormCheck:
    """Outcome of the check: ``applied`` and the relative logit errors of both readings."""

    applied: bool
    error_as_is: float
    error_normed: float

    def describe(self) -> str:
        """One line for the store's attributes."""
        return (
            f"measured at extraction: max relative error against the model's logits {self.error_as_is:.2e} "
            f"for lm_head(h_L), {self.error_normed:.2e} for lm_head(norm(h_L))"
        )


def check_final_norm(adapter: Any, outputs: Any, valid: torch.Tensor) -> FinalNormCheck:
    """Compare both readings of the last hidden state with the model's logits at ``valid`` positions.

    Raises
    ------
    ModelError
        When neither reading reproduces the logits (e.g. a logit soft-cap or scaling the lens
        does not model); the lens would be wrong at every layer.
    """
    with torch.inference_mode():
        last = adapter.hidden_states(outputs)[-1]
        logits = adapter.logits(outputs).float()[valid]
        head = adapter.model.get_output_embeddings()
        as_is = head(last).float()[valid]
        normed = head(adapter.final_norm(last)).float()[valid]
    scale = float(logits.abs().max()) or 1.0
    error_as_is = float((as_is - logits).abs().max()) / scale
    error_normed = float((normed - logits).abs().max()) / scale
    result = FinalNormCheck(error_as_is <= error_normed, error_as_is, error_normed)
    if min(error_as_is, error_normed) > tolerance(last.dtype):
        raise ModelError(
            f"the model's logits match neither lm_head(h_L) (relative error {error_as_is:.1e}) nor "
            f"lm_head(norm(h_L)) ({error_normed:.1e}); its output head does more than the final norm and the "
            "unembedding (a logit soft-cap or scale?), which the logit lens does not model: this model family "
            "is not supported for the lens yet (see docs/models.md)"
        )
    log.info("final norm check: %s", result.describe())
    return result
