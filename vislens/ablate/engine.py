"""The shared-prefix engine: every ablation setting of one input from ONE pass over its image prefix.

With causal attention, the keys and values of the text before the image and of image tokens
``[0, s)`` do not depend on anything after them. One decoder pass over the prefix (the text
before the image and all n image tokens) therefore holds the cache of every setting: a setting
that removes ``[s, e)`` reuses the cached positions ``[0, a + s)`` (a = first image position)
and recomputes only its tail: image tokens ``[e, n)`` and the text after the image. Many settings
run as one batch: the cache is cut to the longest kept prefix of the batch, shorter prefixes are
masked out with a 4D additive mask, and the tail's rotary positions are exactly those of the
ablated input (``a + s`` onwards in ``remove`` style, ``a + e`` in ``block`` style).

The last input token is never fed: its prediction lies beyond the caption and is not scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vislens.errors import ModelError
from vislens.extract.adapters.base import Adapter


@dataclass(frozen=True)
class PairInput:
    """One (image, prompt, caption) input before ablation.

    Parameters
    ----------
    embeds : (token, hidden) decoder input embeddings, image features in place.
    token_ids : (token,) int64 ids of the full input.
    image_start, n_image : the image tokens are positions ``[image_start, image_start + n_image)``.
    caption_start : first scored position; positions ``[caption_start, token)`` are the caption.
    """

    embeds: torch.Tensor
    token_ids: np.ndarray
    image_start: int
    n_image: int
    caption_start: int

    @property
    def n_tokens(self) -> int:
        """Positions of the full input."""
        return int(len(self.token_ids))

    @property
    def prefix_len(self) -> int:
        """Text before the image plus all image tokens."""
        return self.image_start + self.n_image

    @property
    def targets(self) -> torch.Tensor:
        """(caption_token,) int64 ids of the scored caption tokens."""
        return torch.as_tensor(self.token_ids[self.caption_start :], dtype=torch.long, device=self.embeds.device)


@dataclass
class Work:
    """What the decoder computed: forward calls, token positions and query-key pairs (padding included)."""

    forwards: int = 0
    tokens: int = 0
    attention_pairs: int = 0

    def add(self, batch: int, queries: int, keys: int) -> None:
        """Count one decoder call on (batch, queries) tokens attending over ``keys`` columns."""
        self.forwards += 1
        self.tokens += batch * queries
        self.attention_pairs += batch * queries * keys


def image_span(image_mask: np.ndarray) -> tuple[int, int]:
    """(first position, count) of the image tokens of one input, which must be contiguous.

    Raises
    ------
    ModelError
        If there are no image tokens or they are not one contiguous run.
    """
    positions = np.flatnonzero(np.asarray(image_mask))
    if positions.size == 0:
        raise ModelError("the input holds no image tokens; the prompt lost its image placeholder")
    start, count = int(positions[0]), int(positions.size)
    if int(positions[-1]) != start + count - 1:
        raise ModelError("the image tokens are not one contiguous run; ablation supports one image per input")
    return start, count


def check_pair(pair: PairInput) -> None:
    """Refuse an input whose first caption token directly follows the image (its logits would be cached).

    Raises
    ------
    ModelError
        When no text token lies between the image and the caption.
    """
    if pair.caption_start - 1 < pair.prefix_len:
        raise ModelError(
            "the caption starts right after the image tokens; ablation needs at least one text token "
            "(the prompt or the chat template) between the image and the caption"
        )
    if pair.caption_start >= pair.n_tokens:
        raise ModelError("the input holds no caption tokens to score")


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, query, key) bool -> (batch, 1, query, key) float: 0 where allowed, the dtype's min elsewhere."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def caption_losses(adapter: Adapter, hidden: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each caption token from the hidden state that predicts it.

    Parameters
    ----------
    hidden : (batch, token, hidden) final-normed decoder outputs.
    rows : (batch, caption_token) int64 index into ``token`` of the position before each caption token.
    targets : (caption_token,) int64 caption token ids.

    Returns
    -------
    (batch, caption_token) float32.
    """
    picked = hidden.gather(1, rows[..., None].expand(-1, -1, hidden.shape[-1]))
    logp = torch.log_softmax(adapter.ablation_logits(picked).float(), dim=-1)
    return -logp.gather(-1, targets[None, :, None].expand(rows.shape[0], -1, 1))[..., 0]


def run_prefix(adapter: Adapter, pair: PairInput, work: Work | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values, (1, kv_heads, prefix, head_dim) per layer, of the text before the image and all image tokens."""
    n = pair.prefix_len
    if n == 0:
        return []
    cache = adapter.ablation_cache()
    positions = adapter.ablation_position_ids(torch.zeros(1, dtype=torch.long, device=pair.embeds.device), n)
    adapter.ablation_decode(pair.embeds[None, :n], positions, None, cache)
    if work is not None:
        work.add(1, n, n)
    return adapter.ablation_cache_tensors(cache)


def batches(order: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Consecutive slices of ``size`` indices."""
    return [order[i : i + size] for i in range(0, len(order), size)]


def shared_prefix_losses(
    adapter: Adapter,
    pair: PairInput,
    start: np.ndarray,
    stop: np.ndarray,
    *,
    shift: bool,
    batch_size: int = 16,
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    work: Work | None = None,
) -> np.ndarray:
    """Per-token caption losses of every setting, computed from one prefix pass.

    Parameters
    ----------
    start, stop : (setting,) image tokens ``[start, stop)`` removed by each setting.
    shift : ``remove`` style (later positions shift down) if True, ``block`` style if False.
    batch_size : settings per decoder call.
    prefix : `run_prefix` output to reuse (e.g. across prompts sharing the same prefix).

    Returns
    -------
    (setting, caption_token) float32 cross-entropies; their mean over tokens is the loss.
    """
    check_pair(pair)
    if prefix is None:
        prefix = run_prefix(adapter, pair, work)
    a, fed = pair.image_start, pair.n_tokens - 1
    device, dtype = pair.embeds.device, pair.embeds.dtype
    start_t = torch.as_tensor(np.asarray(start), dtype=torch.long, device=device)
    stop_t = torch.as_tensor(np.asarray(stop), dtype=torch.long, device=device)
    before = torch.arange(pair.caption_start, pair.n_tokens, device=device) - 1  # positions predicting the caption
    targets = pair.targets
    out = torch.empty(len(start_t), len(targets), dtype=torch.float32)
    for idx in batches(torch.as_tensor(np.argsort(np.asarray(start), kind="stable")), batch_size):
        s, e = start_t[idx], stop_t[idx]
        first = a + e  # original position of each setting's first recomputed token
        lengths = fed - first
        tail = int(lengths.max())
        cached = a + int(s.max())
        embeds = torch.zeros(len(idx), tail, pair.embeds.shape[-1], dtype=dtype, device=device)
        for b in range(len(idx)):
            embeds[b, : int(lengths[b])] = pair.embeds[int(first[b]) : fed]
        kv = [
            (k[:, :, :cached].expand(len(idx), -1, -1, -1), v[:, :, :cached].expand(len(idx), -1, -1, -1))
            for k, v in prefix
        ]
        cache = adapter.ablation_cache(kv if cached else None)
        keep = torch.arange(cached, device=device)[None, :] < (a + s)[:, None]
        causal = torch.ones(tail, tail, dtype=torch.bool, device=device).tril()
        allowed = torch.cat([keep[:, None, :].expand(-1, tail, -1), causal[None].expand(len(idx), -1, -1)], dim=-1)
        positions = adapter.ablation_position_ids(a + (s if shift else e), tail)
        hidden = adapter.ablation_decode(embeds, positions, additive_mask(allowed, dtype), cache)
        out[idx] = caption_losses(adapter, hidden, before[None, :] - first[:, None], targets).cpu()
        if work is not None:
            work.add(len(idx), tail, cached + tail)
    return out.numpy()
