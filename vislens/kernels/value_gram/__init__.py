"""Per-token Gram matrices of the head outputs, the input of `norm_attention`.

f_h(x_n) = v_{n, kv(h)} W_O^h with W_O^h = w_o[:, h*d:(h+1)*d].T and kv(h) = h // (H / H_kv)
(grouped-query attention). G_n = F_n F_n^T for F_n = (f_1(x_n), ..., f_H(x_n)).

Cost per token is H d D (the head outputs) + H^2 D (their Gram). An exact alternative,
precomputing M_hh' = W_O^h W_O^h'^T once per layer, costs D (H d)^2 up front (69 GFLOP-MACs for
LLaVA-1.5-7B) and (H d)^2 per token, the same as the direct route when D = H d as in Llama; it
only pays off past ~d^2 (16k) tokens per layer and needs a (Hd)^2 matrix per layer, so it is
not used.
"""

from __future__ import annotations

import math

import torch

from vislens.kernels._backend import load, resolve
from vislens.kernels.value_gram import eager

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def value_gram(values: torch.Tensor, w_o: torch.Tensor, n_heads: int, *, backend: str = "auto") -> torch.Tensor:
    """Gram matrices G_n[h, h'] = f_h(x_n) . f_h'(x_n) of a layer's head outputs.

    Parameters
    ----------
    values : (..., N, H_kv * d_head) float16, bfloat16 or float32, as output by `v_proj`.
    w_o : (D, H * d_head), the layer's `o_proj.weight`, same dtypes.
    n_heads : H, the number of attention (query) heads; d_head = w_o.shape[1] // H.
    backend : "auto" | "triton" | "numba" | "torch". On the CPU "auto" means "numba": every
        sum in a fixed order, so a token's Gram matrix is the same bits whatever batch, padding,
        thread count or CPU it was computed with (a resumed store equals an uninterrupted one).
        "torch" (BLAS) is faster (bench/kernels.py), but BLAS picks its summation order by the
        shape of the batch and by the CPU: its last bits follow the batch a token came in.

    Returns
    -------
    (..., N, H, H) float32.
    """
    if values.dtype not in _DTYPES or w_o.dtype not in _DTYPES or values.dim() < 2 or w_o.dim() != 2:
        raise ValueError(
            f"values must be (..., N, H_kv * d) and w_o (D, H * d), float16/bfloat16/"
            f"float32; got {values.dtype} {tuple(values.shape)} and {w_o.dtype} "
            f"{tuple(w_o.shape)}"
        )
    d = w_o.shape[1] // n_heads
    if n_heads < 1 or d * n_heads != w_o.shape[1] or values.shape[-1] % d or n_heads % (values.shape[-1] // d):
        raise ValueError(
            f"w_o (D, H * d) = {tuple(w_o.shape)} with n_heads={n_heads} does not fit "
            f"values with {values.shape[-1]} features (H_kv * d, H_kv dividing H)"
        )
    name = resolve(backend, values, w_o)
    values, w_o = values.detach(), w_o.detach()  # e.g. o_proj.weight, a Parameter
    *lead, n, width = values.shape
    values = values.reshape(math.prod(lead), n, width)
    if name == "torch":
        gram = eager.value_gram(values, w_o, n_heads)
    else:
        gram = load(__name__, name).value_gram(values.contiguous(), w_o.contiguous(), n_heads)
    return gram.reshape(*lead, n, n_heads, n_heads)
