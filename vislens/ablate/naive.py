"""The naive reference: one full decoder pass per setting over the truly ablated input.

``remove`` style: the ablated input is the full input without the removed positions
(`PairInput.removed_span`), right-padded in a batch, each kept token at its rotary position in
the ablated input (`Adapter.ablated_positions`; the decoder builds its causal and padding mask).
``block`` style: the full input, with the key columns of the removed positions masked for every
query after them (a 4D additive mask); positions unchanged. The removed positions' own rows are
computed but nothing reads them. Where image tokens attend to each other in both directions
(`Adapter.image_attention_bidirectional`, Gemma-3), the kept image tokens also see each other
(a 4D mask in both styles). Slow and plain, for checking the shared-prefix engine.
"""

from __future__ import annotations

import numpy as np
import torch

from vislens.ablate.engine import (
    PairInput,
    Work,
    ablated_positions,
    additive_mask,
    batches,
    caption_losses,
    check_pair,
    image_flags,
)
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
    fed = pair.n_tokens - 1
    device, dtype = pair.embeds.device, pair.embeds.dtype
    spans = [torch.as_tensor(v, dtype=torch.long, device=device) for v in pair.removed_span(start, stop)]
    before = torch.arange(pair.caption_start, pair.n_tokens, device=device) - 1
    targets = pair.targets
    col = torch.arange(fed, device=device)
    bidirectional = adapter.image_attention_bidirectional
    image = image_flags(pair, device)[:fed]
    out = torch.empty(len(spans[0]), len(targets), dtype=torch.float32)
    for idx in batches(torch.arange(len(spans[0])), batch_size):
        f, e = spans[0][idx], spans[1][idx]  # positions [f, e) removed
        rope = ablated_positions(adapter, pair, f, e, shift)[:, :, :fed]  # (batch, P, fed)
        removed = (col[None, :] >= f[:, None]) & (col[None, :] < e[:, None])  # (batch, fed)
        if shift:
            lengths = fed - (e - f)
            width = int(lengths.max())
            embeds = torch.zeros(len(idx), width, pair.embeds.shape[-1], dtype=dtype, device=device)
            positions = torch.zeros(len(idx), rope.shape[1], width, dtype=torch.long, device=device)
            for b in range(len(idx)):
                kept = torch.nonzero(~removed[b]).flatten()
                embeds[b, : len(kept)] = pair.embeds[kept]
                positions[b, :, : len(kept)] = rope[b][:, kept]
            mask = torch.arange(width, device=device)[None, :] < lengths[:, None]
            rows = before[None, :] - (e - f)[:, None]
            if bidirectional:
                both = torch.zeros(len(idx), width, dtype=torch.bool, device=device)
                for b in range(len(idx)):
                    both[b, : int(lengths[b])] = image[~removed[b]]
                causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()[None] & mask[:, None, :]
                mask = additive_mask(causal | (both[:, :, None] & both[:, None, :]), dtype)
        else:
            width = fed
            embeds = pair.embeds[None, :fed].expand(len(idx), -1, -1)
            positions = rope
            later = col[:, None] >= e[:, None, None]  # (batch, query, 1)
            causal = torch.ones(fed, fed, dtype=torch.bool, device=device).tril()
            allowed = causal[None] & ~(removed[:, None, :] & later)
            if bidirectional:
                both = image[None, :] & ~removed
                allowed = allowed | (both[:, :, None] & both[:, None, :])
            mask = additive_mask(allowed, dtype)
            rows = before[None, :].expand(len(idx), -1)
        hidden = adapter.ablation_decode(embeds, positions, mask)
        out[idx] = caption_losses(adapter, hidden, rows, targets).cpu()
        if work is not None:
            work.add(len(idx), width, width)
    return out.numpy()
