"""The ablation's options, travelling as one frozen dataclass from the CLI to the store."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vislens.ablate.settings import MODES, STYLES
from vislens.errors import ConfigError

METHODS = ("shared", "naive")
N_DEFAULT_PROMPTS = 5

# options that do not change what ends up in the store (free to differ on a resume)
RUNTIME_ONLY = (
    "out",
    "group",
    "batch_size",
    "threads",
    "device",
    "method",
    "overwrite",
    "strict",
    "progress",
    "storage_options",
    "block",
    "shard",
    "writer_id",
    "wait_s",
)


@dataclass(frozen=True)
class AblateConfig:
    """Options of one ablation run (see ``vislens ablate --help``).

    ``ks`` (truncate) and ``intervals`` / ``interval_width`` (mask) pick the settings; None
    means every k = 1..n, or every single image token. ``caption_index`` picks the scored
    reference caption of each image (default the first). ``method`` ``naive`` runs one full pass
    per setting instead of the shared prefix (same results, for checking).
    """

    model: str
    data: str
    out: str
    mode: str = "truncate"
    ks: tuple[int, ...] | None = None
    intervals: tuple[tuple[int, int], ...] | None = None
    interval_width: int | None = None
    mask_style: str = "block"
    prompts_file: str | None = None
    caption_index: int = 0
    images: str | None = None
    split: str = "test"
    limit: int | None = None
    seed: int | None = None
    token_loss: str | None = "float32"
    batch_size: int | None = None
    """Settings per decoder call; None: 16, or on a resume the group's own (the model's CPU forward
    rounds by the batch's shape: the same batches reproduce the same bits)."""
    threads: int | None = None
    """torch and numba threads; None: the usable cores, or on a resume the group's own."""
    device: str = "auto"
    dtype: str = "auto"
    revision: str | None = None
    group: str = "ablation"
    method: str = "shared"
    overwrite: bool = False
    strict: bool = False
    progress: bool = True
    block: int = 64
    """Images per file of the (sample, prompt) arrays of a new group; ``--shard`` writers own whole blocks."""
    shard: tuple[int, int] = (0, 1)
    writer_id: str | None = None
    """Names this writer's claim on the group (`vislens.store.claims`); None: a new id per run."""
    wait_s: float = 600.0
    storage_options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mask_style not in STYLES:
            raise ConfigError(f"mask style must be one of {STYLES}, got {self.mask_style!r}")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {self.threads}")
        if self.token_loss not in ("float32", "float16", None):
            raise ConfigError(f"token loss must be float32, float16 or none, got {self.token_loss!r}")
        if self.mode == "truncate" and (self.intervals is not None or self.interval_width is not None):
            raise ConfigError("--intervals and --interval-width apply to --mode mask; truncation takes --ks")
        if self.mode == "mask" and self.ks is not None:
            raise ConfigError("--ks applies to --mode truncate; masking takes --intervals or --interval-width")
        if self.intervals is not None and self.interval_width is not None:
            raise ConfigError("give --intervals or --interval-width, not both")
        if self.block < 1:
            raise ConfigError(f"--block must be at least 1, got {self.block}")
        if not 0 <= self.shard[0] < self.shard[1]:
            raise ConfigError(f"--shard i/n needs 0 <= i < n, got {self.shard[0]}/{self.shard[1]}")
        if self.caption_index < 0:
            raise ConfigError(f"--caption-index must be 0 or more, got {self.caption_index}")

    def resolved_device(self) -> str:
        """``auto`` becomes cuda when a GPU is present, else cpu."""
        from vislens.extract.adapters import resolve_device

        return resolve_device(self.device)

    def content_args(self) -> dict[str, Any]:
        """The options that determine the group's content (recorded and fingerprinted)."""
        args = {k: v for k, v in asdict(self).items() if k not in RUNTIME_ONLY}
        for key in ("ks", "intervals"):
            if args[key] is not None:
                args[key] = [list(v) if isinstance(v, tuple) else v for v in args[key]]
        if self.mode == "truncate":
            args.pop("mask_style")
        if self.prompts_file:
            args["prompts_file_sha256"] = hashlib.sha256(Path(self.prompts_file).read_bytes()).hexdigest()
        return args
