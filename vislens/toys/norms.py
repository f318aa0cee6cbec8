"""Random, non-unit norm weights for random-init toy checkpoints.

transformers initialises every RMSNorm/LayerNorm weight to 1 (and LayerNorm biases to 0); a
model whose norms are the identity up to scale hides bugs such as a final norm that is dropped
or applied twice. `randomize_norms` draws them from the seed instead.
"""

from __future__ import annotations

import torch

WEIGHT_RANGE = (0.5, 1.5)
BIAS_RANGE = (-0.25, 0.25)


def is_norm(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer with a weight (RMSNorm, LayerNorm, ...)."""
    weight = getattr(module, "weight", None)
    return "norm" in type(module).__name__.lower() and isinstance(weight, torch.nn.Parameter)


def randomize_norms(model: torch.nn.Module, seed: int) -> int:
    """Draw every norm weight from U(0.5, 1.5) and every norm bias from U(-0.25, 0.25), in place.

    Covers the decoder (every layer's norms and the final norm), the vision tower and any
    Q-Former or projector norms. Deterministic in ``seed`` and the module order. Returns the
    number of norms changed.
    """
    generator = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for _, module in model.named_modules():
            if not is_norm(module):
                continue
            low, high = WEIGHT_RANGE
            weight = module.weight
            weight.copy_(torch.rand(weight.shape, generator=generator) * (high - low) + low)
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.nn.Parameter):
                low, high = BIAS_RANGE
                bias.copy_(torch.rand(bias.shape, generator=generator) * (high - low) + low)
            count += 1
    return count
