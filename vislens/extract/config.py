"""The extraction's options, travelling as one frozen dataclass from the CLI to the store."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vislens.errors import ConfigError

ATTENTION_MODES = ("none", "last", "text", "all")

# options that do not change what ends up in the store (free to differ on a resume)
RUNTIME_ONLY = (
    "out",
    "batch_size",
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
    batch_size: int = 4
    device: str = "auto"
    dtype: str = "auto"
    revision: str | None = None
    attention: str = "text"
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
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")
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
        args["prompts"] = list(self.prompts)
        for name in ("prompts_file", "noisy_prompts_file"):
            path = getattr(self, name)
            if path:
                try:
                    args[f"{name}_sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                except OSError as exc:
                    raise ConfigError(f"cannot read --{name.replace('_', '-')} {path}: {exc.strerror}") from None
        return args


def fingerprint(args: dict[str, Any], plan_rows: list[tuple[str, ...]]) -> str:
    """A hash of the content options and the planned samples."""
    digest = hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode())
    for row in plan_rows:
        digest.update("\x1f".join(row).encode() + b"\x1e")
    return digest.hexdigest()
