"""The vislens store format, version 2: group names, variables, flags and codecs.

This module is the single source of truth for what a store holds; `docs/store-format.md`
describes the same contract for readers without vislens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

FORMAT_VERSION = 2
"""Integer stored in the root attribute ``vislens_format_version`` of stores written now."""
READABLE_VERSIONS = (1, 2)
"""Versions `vislens.open_store` reads (version 1 is upgraded on open, see `vislens.store.upgrade`)."""

GROUPS = ("activations", "attention", "lens", "captions", "results")

# modality of a token position (activations/modality)
PADDING, IMAGE, TEXT = 0, 1, 2
MODALITY_ATTRS = {
    "flag_values": [PADDING, IMAGE, TEXT],
    "flag_meanings": "padding image text",
    "long_name": "modality of the token at this position",
}

# role of a token position in the prompt (activations/token_role)
ROLE_PADDING, ROLE_IMAGE, ROLE_INSTRUCTION, ROLE_TEMPLATE, ROLE_BOS = 0, 1, 2, 3, 4
ROLE_NAMES = ("padding", "image", "instruction", "template", "bos")
ROLE_ATTRS = {
    "flag_values": [ROLE_PADDING, ROLE_IMAGE, ROLE_INSTRUCTION, ROLE_TEMPLATE, ROLE_BOS],
    "flag_meanings": " ".join(ROLE_NAMES),
    "long_name": "role of the token in the prompt",
    "description": "instruction: the prompt text as given (before the chat template); template: chat-template "
    "role words and separators, markers the processor inserts, special tokens other than BOS; bos: the "
    "beginning-of-sequence token",
}

# extraction status of a sample (activations/done)
PENDING, DONE, SKIPPED = 0, 1, 2
DONE_ATTRS = {
    "flag_values": [PENDING, DONE, SKIPPED],
    "flag_meanings": "pending done skipped",
    "long_name": "extraction status; 1 is written only after all of the sample's data",
}

STRING = "string"
"""Zarr v3 variable-length UTF-8 strings (never object dtype)."""

SAFE_DATA_TYPES = frozenset(
    {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}
    | {"float16", "float32", "float64", STRING}
)
SAFE_CODECS = frozenset({"bytes", "blosc", "zstd", "gzip", "crc32c", "sharding_indexed", "transpose", "vlen-utf8"})


@dataclass(frozen=True)
class Variable:
    """One array of the store: its group, dimensions, dtype and attributes."""

    group: str
    name: str
    dims: tuple[str, ...]
    dtype: str
    fill_value: Any
    attrs: dict[str, Any] = field(default_factory=dict)
    per_sample: bool = True
    """Written sample by sample during extraction (else written once at creation)."""


STAT_GROUPS = {
    "cosine": "results/cosine",
    "norm-attention": "results/norm_attention",
    "lens": "results/logit_lens_topk",
}
"""Where each statistic computed at extraction is stored (one group each, with its own coordinates)."""
TEXT_TOKENS = ("instruction", "all", "template")
"""The text-token sets of the cosine analysis, in the order of ``results/cosine``'s ``text_tokens``."""
COSINE_STATS = ("inter_modal", "intra_image", "intra_text")


@dataclass(frozen=True)
class Layout:
    """Sizes of every dimension of a store (fixed at creation).

    Parameters
    ----------
    n_samples, n_layers, n_tokens, d_model : sizes of ``sample``, ``layer`` (L + 1 hidden
        states of the model), ``token`` (the longest sample) and ``d_model`` (the decoder's width).
    n_heads, n_query : attention heads and query rows per sample (0 = no attention captured).
    vocab, n_images, n_captions : lens vocabulary, distinct images, captions per image.
    block : samples per shard of the small per-sample arrays; a writer owns whole blocks.
    layers : the hidden-state layers kept (None: all 0 .. L); attention keeps those >= 1.
    keep_hidden, keep_attention : whether ``hidden`` and the ``attention`` group are stored.
    stats : statistics computed at extraction (``cosine``, ``norm-attention``, ``lens``).
    lens_k : top-k of the ``lens`` statistic.
    """

    n_samples: int
    n_layers: int
    n_tokens: int
    d_model: int
    n_heads: int
    n_query: int
    vocab: int
    n_images: int
    n_captions: int
    block: int = 64
    layers: tuple[int, ...] | None = None
    keep_hidden: bool = True
    keep_attention: bool = True
    stats: tuple[str, ...] = ()
    lens_k: int = 0
    captures: tuple[Any, ...] = ()
    """Arrays of the ``captures`` group (`vislens.extract.modules.CaptureArray`-like: name, dims, sizes, attrs)."""

    @property
    def attention(self) -> bool:
        """Whether the store has an attention group."""
        return self.n_query > 0 and self.keep_attention

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        """Hidden-state layers stored in ``activations`` (0 = embeddings, l = decoder layer l's output)."""
        return tuple(range(self.n_layers)) if self.layers is None else tuple(self.layers)

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """Decoder layers (1 .. L) stored in ``attention``."""
        return tuple(layer for layer in self.hidden_layers if layer >= 1)

    def sizes(self, group: str = "activations") -> dict[str, int]:
        """Every dimension name with its size in ``group`` (its ``layer`` dimension differs by group)."""
        layers = {
            "activations": len(self.hidden_layers),
            "attention": len(self.attention_layers),
            "results/cosine": self.n_layers,
            "results/logit_lens_topk": self.n_layers,
            "results/norm_attention": self.n_layers - 1,
            "captures": self.n_layers - 1,
        }
        extra = {d: n for array in self.captures for d, n in zip(array.dims, array.sizes)}
        return extra | {
            "sample": self.n_samples,
            "layer": layers.get(group, self.n_layers),
            "token": self.n_tokens,
            "d_model": self.d_model,
            "head": self.n_heads,
            "head2": self.n_heads,
            "query": self.n_query,
            "vocab": self.vocab,
            "image": self.n_images,
            "caption": self.n_captions,
            "grid": 2,
            "text_tokens": len(TEXT_TOKENS),
            "stat": len(COSINE_STATS),
            "rank": self.lens_k,
        }

    def layer_labels(self, group: str) -> tuple[int, ...]:
        """The ``layer`` coordinate of a group."""
        if group == "activations":
            return self.hidden_layers
        if group == "attention":
            return self.attention_layers
        if group in ("results/norm_attention", "captures"):
            return tuple(range(1, self.n_layers))
        return tuple(range(self.n_layers))


def variables(layout: Layout, version: int = FORMAT_VERSION) -> list[Variable]:
    """All variables of a store with this layout, in write order (``done`` last).

    ``version`` 1 gives the variables of a version 1 store (width dimension ``hidden``, no
    ``token_role``), for checking old stores.
    """
    current = _variables(layout)
    if version == FORMAT_VERSION:
        return current
    if version != 1:
        raise ValueError(f"unknown store format version {version}")
    renamed = lambda dims: tuple("hidden" if d == "d_model" else d for d in dims)  # noqa: E731
    return [
        Variable(v.group, v.name, renamed(v.dims), v.dtype, v.fill_value, v.attrs, v.per_sample)
        for v in current
        if v.name != "token_role"
    ]


def _variables(layout: Layout) -> list[Variable]:
    acts = [
        Variable(
            "activations",
            "hidden",
            ("sample", "layer", "token", "d_model"),
            "float16",
            np.float16("nan"),
            {"long_name": "hidden state of the language decoder (residual stream) after decoder layer l"},
        ),
        Variable(
            "activations",
            "token_id",
            ("sample", "token"),
            "int32",
            -1,
            {"long_name": "input token id; -1 at padding positions"},
        ),
        Variable("activations", "modality", ("sample", "token"), "uint8", PADDING, MODALITY_ATTRS),
        Variable("activations", "token_role", ("sample", "token"), "uint8", ROLE_PADDING, ROLE_ATTRS),
        Variable("activations", "n_tokens", ("sample",), "int32", 0, {"long_name": "valid positions"}),
        Variable(
            "activations",
            "image_grid",
            ("sample", "grid"),
            "int32",
            0,
            {"long_name": "rows and columns of the image-token patch grid (0 0 when unknown)"},
        ),
    ]
    plan = [
        Variable("activations", name, ("sample",), STRING, "", {"long_name": doc}, per_sample=False)
        for name, doc in (
            ("image_id", "id of the image of this sample"),
            ("prompt_kind", "normal, noisy, empty or custom"),
            ("prompt_id", "id of the prompt within its kind"),
            ("prompt_text", "the instruction as given, before the chat template"),
        )
    ] + [
        Variable(
            "activations",
            "image_index",
            ("sample",),
            "int32",
            -1,
            {"long_name": "position of this sample's image along captions/image"},
            per_sample=False,
        )
    ]
    attn = []
    if layout.attention:
        attn = [
            Variable(
                "attention",
                "attn",
                ("sample", "layer", "head", "query", "token"),
                "float16",
                np.float16(0),
                {"long_name": "attention weights of the selected query rows in decoder layer l"},
            ),
            Variable(
                "attention",
                "value_gram",
                ("sample", "layer", "token", "head", "head2"),
                "float32",
                np.float32(0),
                {"long_name": "Gram matrix of the head-transformed values f_h(x_j) . f_h2(x_j)"},
            ),
            Variable(
                "attention",
                "query_pos",
                ("sample", "query"),
                "int32",
                -1,
                {"long_name": "token position of each query row; -1 = unused row"},
            ),
        ]
    if not layout.keep_hidden:
        acts = [v for v in acts if v.name != "hidden"]
    done = Variable("activations", "done", ("sample",), "uint8", PENDING, DONE_ATTRS)
    captures = [
        Variable("captures", a.name, ("sample", *a.dims), "float16", np.float16("nan"), dict(a.attrs))
        for a in layout.captures
    ]
    return acts + plan + attn + captures + _stat_variables(layout) + [done]


def _stat_variables(layout: Layout) -> list[Variable]:
    """The per-sample results of statistics computed at extraction."""
    out = []
    if "cosine" in layout.stats:
        out.append(
            Variable(
                STAT_GROUPS["cosine"],
                "cosine",
                ("sample", "layer", "text_tokens", "stat"),
                "float32",
                np.float32("nan"),
                {
                    "long_name": "mean cosine similarities per layer, text-token set and statistic (computed at extraction)"
                },
            )
        )
    if "norm-attention" in layout.stats:
        group = STAT_GROUPS["norm-attention"]
        out += [
            Variable(
                group,
                "image_share",
                ("sample", "layer"),
                "float32",
                np.float32("nan"),
                {"long_name": "share of the text queries' norm-based attention on image tokens"},
            ),
            Variable(
                group,
                "image_share_after_image",
                ("sample", "layer"),
                "float32",
                np.float32("nan"),
                {
                    "long_name": "share of norm-based attention on image tokens, text queries after the first image token"
                },
            ),
            Variable(
                group,
                "last_query",
                ("sample", "layer", "token"),
                "float32",
                np.float32(0),
                {"long_name": "norm-based attention from the last prompt token to each token"},
            ),
        ]
    if "lens" in layout.stats:
        group = STAT_GROUPS["lens"]
        out += [
            Variable(
                group,
                "logit_lens_topk",
                ("sample", "layer", "token", "rank"),
                "int32",
                -1,
                {"long_name": "top-k token ids of the logit lens (-1: not decoded)"},
            ),
            Variable(
                group,
                "logit_lens_topk_values",
                ("sample", "layer", "token", "rank"),
                "float32",
                np.float32("nan"),
                {"long_name": "the logits of those ids"},
            ),
        ]
    return out


def chunking(var: Variable, layout: Layout) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Inner chunk shape and shard shape of a per-sample variable.

    Big arrays: one chunk per (sample, layer), one shard per sample (so concurrent writers
    never share a file). Small arrays: one chunk per sample, one shard per block.
    """
    sizes = layout.sizes(var.group)
    shape = tuple(sizes[d] for d in var.dims)
    if var.name in SAMPLE_FILES or (var.group == "captures" and len(shape) >= 4):
        chunk = (1, 1) + shape[2:]
        return chunk, (1,) + shape[1:]
    if var.group == "captures":
        return (1,) + shape[1:], (1,) + shape[1:]
    chunk = (1,) + shape[1:]
    return chunk, (min(layout.block, shape[0]),) + shape[1:]


SAMPLE_FILES = frozenset({"hidden", "attn", "value_gram", "logit_lens_topk", "logit_lens_topk_values", "last_query"})
"""Per-sample arrays big enough for one shard file per sample (one inner chunk per layer)."""
