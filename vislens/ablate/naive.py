"""The naive reference: one full decoder pass per setting over the truly ablated input.

``remove`` style: the ablated input is the full input without image tokens ``[start, stop)``,
right-padded in a batch, positions from 0 (the decoder builds its causal and padding mask).
``block`` style: the full input, with the key columns of ``[start, stop)`` masked for every
query after the interval (a 4D additive mask); positions unchanged. The interval's own rows are
computed but nothing reads them. Slow and plain, for checking the shared-prefix engine.
"""

from __future__ import annotations

import numpy as np
import torch

from vislens.ablate.engine import PairInput, Work, additive_mask, batches, caption_losses, check_pair
from vislens.extract.adapters.base import Adapter


def naive_losses(
    adapter: Adapter,
    pair: PairInput,
    start: np.ndarray,
    stop: np.ndarray,
    *,
    shift: bool,
    batch_size: int = 16,
    work: Work | None = None,
) -> np.ndarray:
    """Per-token caption losses of every setting, one ablated input per setting.

    Same parameters and result as `vislens.ablate.engine.shared_prefix_losses`:
    (setting, caption_token) float32.
    """
    check_pair(pair)
    a, fed = pair.image_start, pair.n_tokens - 1
    device, dtype = pair.embeds.device, pair.embeds.dtype
    before = torch.arange(pair.caption_start, pair.n_tokens, device=device) - 1
    targets = pair.targets
    out = torch.empty(len(start), len(targets), dtype=torch.float32)
    for idx in batches(torch.arange(len(start)), batch_size):
        s = torch.as_tensor(np.asarray(start)[idx.numpy()], dtype=torch.long, device=device)
        e = torch.as_tensor(np.asarray(stop)[idx.numpy()], dtype=torch.long, device=device)
        if shift:
            lengths = fed - (e - s)
            width = int(lengths.max())
            embeds = torch.zeros(len(idx), width, pair.embeds.shape[-1], dtype=dtype, device=device)
            for b in range(len(idx)):
                kept = torch.cat([pair.embeds[: a + int(s[b])], pair.embeds[a + int(e[b]) : fed]])
                embeds[b, : len(kept)] = kept
            mask = torch.arange(width, device=device)[None, :] < lengths[:, None]
            rows = before[None, :] - (e - s)[:, None]
        else:
            width = fed
            embeds = pair.embeds[None, :fed].expand(len(idx), -1, -1)
            col = torch.arange(fed, device=device)
            blocked = (col[None, :] >= a + s[:, None]) & (col[None, :] < a + e[:, None])  # (batch, key)
            later = col[:, None] >= (a + e)[:, None, None]  # (batch, query, 1)
            causal = torch.ones(fed, fed, dtype=torch.bool, device=device).tril()
            mask = additive_mask(causal[None] & ~(blocked[:, None, :] & later), dtype)
            rows = before[None, :].expand(len(idx), -1)
        positions = adapter.ablation_position_ids(torch.zeros(len(idx), dtype=torch.long, device=device), width)
        hidden = adapter.ablation_decode(embeds, positions, mask)
        out[idx] = caption_losses(adapter, hidden, rows, targets).cpu()
        if work is not None:
            work.add(len(idx), width, width)
    return out.numpy()
