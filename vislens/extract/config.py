"""The extraction's options, travelling as one frozen dataclass from the CLI to the store."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vislens.errors import ConfigError

ATTENTION_MODES = ("none", "last", "text", "all")
KEEP = ("hidden", "attention")
"""What the store can hold per sample: hidden states, attention (weights and value Gram matrices)."""
COMPUTE = ("cosine", "norm-attention", "lens")
"""Statistics that can be computed during extraction, on the model's device (into ``results``)."""
LENS_TOPK = 5
"""Default top-k of ``--compute lens``: the study uses top-1; 5 covers top-k re-scoring up to 5 at
~0.6 MB per LLaVA-7B sample (576 image tokens x 33 layers x 5 x (int32 id + float32 logit)),
against 168 MB of hidden states."""


def parse_layers(text: str, n_states: int | None = None) -> tuple[int, ...]:
    """``--layers``: a slice ``start:stop[:step]`` (Python's rules) or a comma list, e.g. ``0:33:4``
    or ``0,8,16,32``; with ``n_states`` (L + 1) the result is checked and sorted.

    Raises
    ------
    ConfigError
        On a malformed value, or layers outside 0 .. L.
    """
    text = text.strip()
    try:
        if ":" in text:
            parts = [int(p) if p.strip() else None for p in text.split(":")]
            if len(parts) > 3:
                raise ValueError
            start, stop = parts[0] or 0, parts[1] if len(parts) > 1 else None
            step = parts[2] if len(parts) > 2 and parts[2] is not None else 1
            if stop is None:
                if n_states is None:
                    raise ConfigError(f"--layers {text}: an open-ended slice needs the model's layer count")
                stop = n_states
            layers = tuple(range(start, stop, step))
        else:
            layers = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ConfigError(
            f"--layers takes start:stop[:step] or a comma list (e.g. 0:33:4 or 0,16,32), got {text!r}"
        ) from None
    if not layers:
        raise ConfigError(f"--layers {text!r} selects no layer")
    if n_states is not None and not all(0 <= layer < n_states for layer in layers):
        raise ConfigError(f"--layers {text!r}: this model has hidden states 0 .. {n_states - 1}")
    return tuple(sorted(set(layers)))


# options that do not change what ends up in the store (free to differ on a resume)
RUNTIME_ONLY = (
    "out",
    "batch_size",
    "threads",
    "device",
    "shard",
    "overwrite",
    "strict",
    "progress",
    "storage_options",
    "wait_s",
    "writer_id",
)


@dataclass(frozen=True)
class ExtractConfig:
    """Options of one extraction (see ``vislens extract --help``)."""

    model: str
    data: str
    out: str
    prompts: tuple[str, ...] = ("normal",)
    prompt: str | None = None
    prompts_file: str | None = None
    noisy_prompts_file: str | None = None
    all_prompts: bool = False
    images: str | None = None
    split: str = "test"
    limit: int | None = None
    seed: int | None = None
    noise_seed: int = 0
    batch_size: int | None = None
    """Samples per forward pass; None: 4, or on a resume the batch size the store was written with
    (the model's CPU forward rounds by the batch's shape: the same batches reproduce the same bits)."""
    threads: int | None = None
    """torch and numba threads; None: the usable cores, or on a resume the store's own."""
    device: str = "auto"
    dtype: str = "auto"
    revision: str | None = None
    attention: str = "text"
    keep: tuple[str, ...] = KEEP
    capture: tuple[str, ...] = ()
    compute: tuple[str, ...] = ()
    layers: str | None = None
    lens_topk: int = LENS_TOPK
    lens_all_tokens: bool = False
    keep_bits: int | None = None
    block: int = 64
    clevel: int = 1
    shard: tuple[int, int] = (0, 1)
    overwrite: bool = False
    strict: bool = False
    progress: bool = True
    wait_s: float = 600.0
    writer_id: str | None = None
    """Names this writer's claim on the store (`vislens.store.claims`); a run resumed under the same
    id (a retried cluster task) takes over its own claim at once. None: a new id per run."""
    storage_options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_MODES:
            raise ConfigError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {self.threads}")
        unknown = [k for k in self.keep if k not in KEEP]
        if unknown:
            raise ConfigError(f"--keep takes {', '.join(KEEP)} or none, got {', '.join(unknown)}")
        if self.capture:
            from vislens.extract.modules import parse_capture

            parse_capture(",".join(self.capture))
        unknown = [c for c in self.compute if c not in COMPUTE]
        if unknown:
            raise ConfigError(f"--compute takes {', '.join(COMPUTE)}, got {', '.join(unknown)}")
        if "norm-attention" in self.compute and self.attention == "none":
            raise ConfigError("--compute norm-attention needs attention query rows: pass --attention last, text or all")
        if not 1 <= self.lens_topk <= 1000:
            raise ConfigError(f"--lens-topk must be 1..1000, got {self.lens_topk}")
        if self.layers is not None:
            parse_layers(self.layers)  # syntax now; the range once the model is known
        if self.keep_bits is not None and not 1 <= self.keep_bits <= 10:
            raise ConfigError(f"keep_bits must be 1..10 (fp16 has 10 mantissa bits), got {self.keep_bits}")
        if self.prompt is not None and not self.prompt.strip():
            raise ConfigError("--prompt is empty; leave it out, or use --prompts empty for no instruction")

    def resolved_device(self) -> str:
        """``auto`` becomes cuda when a GPU is present, else cpu."""
        from vislens.extract.adapters import resolve_device

        return resolve_device(self.device)

    def content_args(self) -> dict[str, Any]:
        """The options that determine the store's content (recorded and fingerprinted)."""
        args = {k: v for k, v in asdict(self).items() if k not in RUNTIME_ONLY}
        for name in ("prompts_file", "noisy_prompts_file"):
            path = getattr(self, name)
            if path:
                try:
                    args[f"{name}_sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                except OSError as exc:
                    raise ConfigError(f"cannot read --{name.replace('_', '-')} {path}: {exc.strerror}") from None
        return json.loads(json.dumps(args, default=str))  # as stored: tuples become lists


def fingerprint(args: dict[str, Any], plan_rows: list[tuple[str, ...]]) -> str:
    """A hash of the content options and the planned samples."""
    digest = hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode())
    for row in plan_rows:
        digest.update("\x1f".join(row).encode() + b"\x1e")
    return digest.hexdigest()
