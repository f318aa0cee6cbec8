"""Per-sample statistics of the analyses, from one sample's tensors (the same code at extraction,
on the model's device, and offline in `vislens.analyze`), so both give the same numbers.

- `cosine_stats`: inter-modal and intra-modal mean cosine per layer (docs/methods.md, analysis 2).
- `attention_shares`: the image share of norm-based attention and the last query's row
  (docs/methods.md, analysis 3).
"""

from __future__ import annotations

import torch

COSINE_STATS = ("inter_modal", "intra_image", "intra_text")


def intra_mean_cosine(h: torch.Tensor, mask: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Mean cosine over ordered pairs i != j of the masked rows of ``h`` (..., token, d), from the
    all-pairs mean; NaN below two rows. (...) float32."""
    from vislens.kernels.mean_cosine import mean_cosine

    all_pairs = mean_cosine(h, h, a_mask=mask, b_mask=mask, backend=backend)
    m = mask.sum(-1).to(torch.float32)
    nonzero = ((h.float().norm(dim=-1) > 0) & mask).sum(-1).to(torch.float32)
    mean = (m * m * all_pairs - nonzero) / (m * (m - 1))
    return torch.where(m > 1, mean, torch.nan)


def cosine_stats(h: torch.Tensor, image: torch.Tensor, text: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Inter-modal, intra-image and intra-text mean cosine.

    Parameters
    ----------
    h : (..., token, d) hidden states (float16 as stored, or float32).
    image, text : (..., token) bool: the image tokens and the chosen text tokens.

    Returns
    -------
    (..., 3) float32: ``COSINE_STATS`` in order; inter_modal is NaN without text tokens.
    """
    from vislens.kernels.mean_cosine import mean_cosine

    image, text = image.expand(h.shape[:-1]), text.expand(h.shape[:-1])
    inter = mean_cosine(h, h, a_mask=image, b_mask=text, backend=backend)
    inter = torch.where(text.sum(-1) > 0, inter, torch.nan)
    return torch.stack([inter, intra_mean_cosine(h, image, backend), intra_mean_cosine(h, text, backend)], dim=-1)


def attention_shares(
    summed: torch.Tensor, positions: torch.Tensor, image: torch.Tensor, text_rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image shares of norm-based attention and the last query's row, for one sample.

    Parameters
    ----------
    summed : (layer, query, n) all-heads norm-based attention NA(q, j) of the stored query rows.
    positions : (query,) int token position of each query row.
    image : (n,) bool image tokens.
    text_rows : (query,) bool: which query rows are text tokens.

    Returns
    -------
    share (layer,): mean over text query rows of sum_{j image} NA(q, j) / sum_j NA(q, j) (NaN
    without text rows); after (layer,): the same over text rows after the first image token;
    last (layer, n): the row of the query at the last position n - 1 (zeros if not stored).
    All float32.
    """
    summed = summed.float()
    n_layers, _, n = summed.shape
    totals = summed.sum(-1)
    on_image = summed[..., image].sum(-1)
    shares = torch.where(totals > 0, on_image / torch.where(totals > 0, totals, 1.0), 0.0)  # (layer, query)
    shares = torch.where(totals.isnan(), torch.nan, shares)  # a layer without self-attention (Mllama's cross-attention)
    nan = torch.full((n_layers,), torch.nan)
    share = shares[:, text_rows].mean(-1) if bool(text_rows.any()) else nan
    first_image = int(torch.nonzero(image)[0]) if bool(image.any()) else n
    seen = text_rows & (positions > first_image)
    after = shares[:, seen].mean(-1) if bool(seen.any()) else nan
    last = torch.zeros((n_layers, n), dtype=torch.float32)
    is_last = torch.nonzero(positions == n - 1).flatten()
    if is_last.numel():
        last = summed[:, int(is_last[0])].clone()
    return share, after, last
