"""backend="torch": lens_topk in plain torch on any device, the vocabulary a block at a time.

Each block's fp32 logits come from one matmul; the running top k is kept as int64 keys that
order (value, id) pairs by the tie rule (see `keys`), so torch.topk over keys, unlike
torch.topk over values, picks ties by id. Values are the matmul's fp32 sums, which can differ
from the correctly rounded ones of the reference in the last bits (so ids can differ only where
two logits are that close).
"""

from __future__ import annotations

import torch

_LOW = 2**32 - 1


def keys(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """int64 keys, larger for a larger fp32 value or, at equal values, a smaller id (< 2^32).

    The fp32 bits, read as int32, order positive values; negative ones have their magnitude bits
    flipped so that they order too; -0.0 is first made +0.0.
    """
    bits = torch.where(values == 0, torch.zeros_like(values), values).view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    return ordered * 2**32 + (_LOW - ids.to(torch.int64))


def unkey(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 values, int64 ids) back from `keys`."""
    ordered = torch.div(key, 2**32, rounding_mode="floor")
    ids = _LOW - (key - ordered * 2**32)
    ordered = ordered.to(torch.int32)
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    return bits.view(torch.float32), ids


def lens_topk(
    x: torch.Tensor, weight: torch.Tensor, k: int, *, vocab_block: int = 8192, row_block: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (rows, d) float32 normed rows; weight: (vocab, d) -> (rows, k) float32 values, int64 ids."""
    rows, vocab = x.shape[0], weight.shape[0]
    values = torch.empty(rows, k, dtype=torch.float32, device=x.device)
    ids = torch.empty(rows, k, dtype=torch.int64, device=x.device)
    for r0 in range(0, rows, row_block):
        chunk = x[r0 : r0 + row_block]
        best = torch.empty(chunk.shape[0], 0, dtype=torch.int64, device=x.device)
        for v0 in range(0, vocab, vocab_block):
            logits = chunk @ weight[v0 : v0 + vocab_block].float().T
            block_ids = torch.arange(v0, v0 + logits.shape[1], device=x.device).expand_as(logits)
            block = keys(logits, block_ids).topk(min(k, logits.shape[1]), dim=1).values
            best = torch.cat([best, block], dim=1).topk(min(k, best.shape[1] + block.shape[1]), dim=1).values
        values[r0 : r0 + row_block], ids[r0 : r0 + row_block] = unkey(best)
    return values, ids
