"""Per-sample statistics of the analyses, from one sample's tensors (the same code at extraction,
on the model's device, and offline in `vislens.analyze`), so both give the same numbers.

- `cosine_stats`: inter-modal and intra-modal mean cosine per layer (docs/methods.md, analysis 2).
- `attention_shares`: the image share of norm-based attention and the last query's row
  (docs/methods.md, analysis 3).
"""

from __future__ import annotations

import numpy as np
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
    All float32. The sums and means run in float64 in numpy's fixed order (pairwise along the
    tokens), on the CPU, and are rounded once: the same bits on any machine, at extraction on a
    GPU or offline.
    """
    na = summed.detach().float().cpu().numpy()
    positions, image, text_rows = (t.detach().cpu().numpy() for t in (positions, image, text_rows))
    n_layers, _, n = na.shape
    wide = na.astype(np.float64)
    totals = wide.sum(-1)
    on_image = np.ascontiguousarray(wide[..., image]).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.where(totals > 0, on_image / np.where(totals > 0, totals, 1.0), 0.0)  # (layer, query)
    shares = np.where(np.isnan(totals), np.nan, shares)  # a layer without self-attention (Mllama's cross-attention)
    nan = np.full(n_layers, np.nan)
    share = np.ascontiguousarray(shares[:, text_rows]).mean(-1) if text_rows.any() else nan
    first_image = int(np.flatnonzero(image)[0]) if image.any() else n
    seen = text_rows & (positions > first_image)
    after = np.ascontiguousarray(shares[:, seen]).mean(-1) if seen.any() else nan
    last = np.zeros((n_layers, n), dtype=np.float32)
    is_last = np.flatnonzero(positions == n - 1)
    if is_last.size:
        last = na[:, int(is_last[0])].copy()
    as_f32 = lambda x: torch.from_numpy(np.asarray(x, dtype=np.float32))  # noqa: E731
    return as_f32(share), as_f32(after), as_f32(last)
