"""The shared-prefix engine: every ablation setting of one input from ONE pass over its image prefix.

A setting removes image tokens ``[s, e)`` (0-based, among the n image tokens): the input positions
from that of image token s through that of image token e - 1, with any text tokens between them
(the tile markers of Idefics3; image tokens of the other families are one run). With causal
attention, the keys and values of every position before the first removed one do not depend on
anything after it. One decoder pass over the prefix (the text before the image and the image,
up to its last token) therefore holds the cache of every setting: a setting reuses the cached
positions before its removed span and recomputes only its tail (what follows the span). Many
settings run as one batch: the cache is cut to the longest kept prefix of the batch, shorter
prefixes are masked out with a 4D additive mask, and the tail's rotary positions are exactly
those of the ablated input (`Adapter.ablated_positions`: shifted down in ``remove`` style,
unchanged in ``block`` style; Qwen2-VL's 3-D positions follow its own rule).

Where image tokens attend to each other in both directions (Gemma-3,
`Adapter.image_attention_bidirectional`), removing one changes the keys and values of the kept
image tokens before it too: the prefix pass then covers only the text before the image, and each
setting recomputes its kept image tokens with its tail (one bidirectional block of the kept image
tokens, causal elsewhere, as the model's own forward on the ablated input).

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
    image_start, n_image : first image position and number of image tokens.
    caption_start : first scored position; positions ``[caption_start, token)`` are the caption.
    image_positions : (n_image,) int64 positions of the image tokens; None: the run
        ``[image_start, image_start + n_image)``.
    positions : (P, token) int64 rotary positions of the full input; None: ``0, 1, 2, ...`` (P = 1).
    """

    embeds: torch.Tensor
    token_ids: np.ndarray
    image_start: int
    n_image: int
    caption_start: int
    image_positions: np.ndarray | None = None
    positions: torch.Tensor | None = None

    def __post_init__(self) -> None:
        image = self.image_pos
        if len(image) != self.n_image or (len(image) and int(image[0]) != self.image_start):
            raise ModelError(
                f"image positions {image.tolist()} do not start at {self.image_start} with {self.n_image} tokens"
            )

    @property
    def n_tokens(self) -> int:
        """Positions of the full input."""
        return int(len(self.token_ids))

    @property
    def image_pos(self) -> np.ndarray:
        """(n_image,) int64 positions of the image tokens."""
        if self.image_positions is None:
            return np.arange(self.image_start, self.image_start + self.n_image, dtype=np.int64)
        return np.asarray(self.image_positions, dtype=np.int64)

    @property
    def rope(self) -> torch.Tensor:
        """(P, token) int64 rotary positions of the full input."""
        if self.positions is None:
            return torch.arange(self.n_tokens, device=self.embeds.device)[None]
        return self.positions.to(self.embeds.device)

    @property
    def prefix_len(self) -> int:
        """Text before the image plus the image, through its last image token."""
        return int(self.image_pos[-1]) + 1 if self.n_image else self.image_start

    def removed_span(self, start: np.ndarray, stop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first, end): the positions ``[first, end)`` that removing image tokens ``[start, stop)`` removes.

        From image token ``start`` through image token ``stop - 1`` (text tokens between them
        included); an empty interval removes nothing (``first = end``).
        """
        start, stop = np.asarray(start, dtype=np.int64), np.asarray(stop, dtype=np.int64)
        bounds = np.append(self.image_pos, self.prefix_len)  # position of image token i; i = n: after the image
        first = bounds[start]
        end = np.where(stop > start, bounds[np.maximum(stop - 1, 0)] + 1, first)
        return first, end

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


def image_span(image_mask: np.ndarray, contiguous: bool = True) -> tuple[int, int]:
    """(first position, count) of the image tokens of one input, which must be contiguous unless not ``contiguous``.

    Raises
    ------
    ModelError
        If there are no image tokens or they are not one contiguous run.
    """
    positions = np.flatnonzero(np.asarray(image_mask))
    if positions.size == 0:
        raise ModelError("the input holds no image tokens; the prompt lost its image placeholder")
    start, count = int(positions[0]), int(positions.size)
    if contiguous and int(positions[-1]) != start + count - 1:
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


def reusable_prefix(adapter: Adapter, pair: PairInput) -> int:
    """Positions whose keys and values no ablation setting changes: the text before the image and
    the image (`PairInput.prefix_len`), or the text before the image alone where image tokens
    attend to each other in both directions (`Adapter.image_attention_bidirectional`)."""
    return pair.image_start if adapter.image_attention_bidirectional else pair.prefix_len


def image_flags(pair: PairInput, device: torch.device) -> torch.Tensor:
    """(token,) bool: the image positions of the full input."""
    flags = torch.zeros(pair.n_tokens, dtype=torch.bool, device=device)
    flags[torch.as_tensor(pair.image_pos, device=device)] = True
    return flags


def run_prefix(adapter: Adapter, pair: PairInput, work: Work | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values, (1, kv_heads, prefix, head_dim) per layer, of the `reusable_prefix` positions
    (the text before the image and all image tokens, for causal image tokens)."""
    n = reusable_prefix(adapter, pair)
    if n == 0:
        return []
    cache = adapter.ablation_cache()
    adapter.ablation_decode(pair.embeds[None, :n], pair.rope[None, :, :n], None, cache)
    if work is not None:
        work.add(1, n, n)
    return adapter.ablation_cache_tensors(cache)


def batches(order: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Consecutive slices of ``size`` indices."""
    return [order[i : i + size] for i in range(0, len(order), size)]


def ablated_positions(
    adapter: Adapter, pair: PairInput, first: torch.Tensor, end: torch.Tensor, shift: bool
) -> torch.Tensor:
    """(setting, P, token) rotary positions of each setting's ablated input, positions ``[first, end)`` removed."""
    index = torch.arange(pair.n_tokens, device=first.device)
    removed = (index[None, :] >= first[:, None]) & (index[None, :] < end[:, None])
    return adapter.ablated_positions(pair.rope, image_flags(pair, first.device), removed, shift)


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
    start, stop : (setting,) image tokens ``[start, stop)`` removed by each setting (`PairInput.removed_span`).
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
    fed = pair.n_tokens - 1
    device, dtype = pair.embeds.device, pair.embeds.dtype
    spans = pair.removed_span(start, stop)
    first_t, end_t = (torch.as_tensor(v, dtype=torch.long, device=device) for v in spans)
    before = torch.arange(pair.caption_start, pair.n_tokens, device=device) - 1  # positions predicting the caption
    targets = pair.targets
    out = torch.empty(len(first_t), len(targets), dtype=torch.float32)
    limit = reusable_prefix(adapter, pair)
    image = image_flags(pair, device)
    for idx in batches(torch.as_tensor(np.argsort(spans[0], kind="stable")), batch_size):
        removed, first = first_t[idx], end_t[idx]  # positions [removed, first) are removed; the tail goes on at first
        kept = removed.clamp(max=limit)  # positions [0, kept) come from the cache
        head = removed - kept  # kept positions recomputed before the removed span (bidirectional image tokens)
        lengths = head + fed - first
        tail = int(lengths.max())
        cached = int(kept.max())
        steps = torch.arange(tail, device=device)[None, :]
        columns = torch.where(steps < head[:, None], kept[:, None] + steps, first[:, None] + steps - head[:, None])
        columns = columns.clamp(max=fed - 1)  # (batch, tail): position in the full input of each tail entry
        valid = steps < lengths[:, None]
        embeds = torch.where(valid[..., None], pair.embeds[columns], torch.zeros((), dtype=dtype, device=device))
        kv = [
            (k[:, :, :cached].expand(len(idx), -1, -1, -1), v[:, :, :cached].expand(len(idx), -1, -1, -1))
            for k, v in prefix
        ]
        cache = adapter.ablation_cache(kv if cached else None)
        keep = torch.arange(cached, device=device)[None, :] < kept[:, None]
        causal = torch.ones(tail, tail, dtype=torch.bool, device=device).tril()[None].expand(len(idx), -1, -1)
        if adapter.image_attention_bidirectional:
            both = image[columns] & valid
            causal = causal | (both[:, :, None] & both[:, None, :])
        allowed = torch.cat([keep[:, None, :].expand(-1, tail, -1), causal], dim=-1)
        rope = ablated_positions(adapter, pair, removed, first, shift)
        positions = rope.gather(2, columns[:, None, :].expand(-1, rope.shape[1], -1))
        hidden = adapter.ablation_decode(embeds, positions, additive_mask(allowed, dtype), cache)
        rows = head[:, None] + before[None, :] - first[:, None]
        out[idx] = caption_losses(adapter, hidden, rows, targets).cpu()
        if work is not None:
            work.add(len(idx), tail, cached + tail)
    return out.numpy()
