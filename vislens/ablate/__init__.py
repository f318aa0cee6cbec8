"""Ablation: caption loss against the image tokens kept (truncation) or removed (masking).

One decoder pass over an input's image prefix serves every setting (`engine`); `naive` runs
one full pass per setting for checking; `run.ablate` writes results into a store's ``ablation``
group, resumably.
"""

from __future__ import annotations

from vislens.ablate.config import AblateConfig
from vislens.ablate.engine import PairInput, Work, run_prefix, shared_prefix_losses
from vislens.ablate.naive import naive_losses
from vislens.ablate.run import AblateResult, ablate
from vislens.ablate.settings import Settings, masking_settings, truncation_settings

__all__ = [
    "AblateConfig",
    "AblateResult",
    "PairInput",
    "Settings",
    "Work",
    "ablate",
    "masking_settings",
    "naive_losses",
    "run_prefix",
    "shared_prefix_losses",
    "truncation_settings",
]
