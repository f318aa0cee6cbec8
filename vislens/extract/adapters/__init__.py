"""Adapter registry: one adapter per model family, chosen by the config's ``model_type``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from vislens.errors import ModelError, UnsupportedModelError
from vislens.extract.adapters.base import Adapter, AttentionShape, NormSpec
from vislens.extract.adapters.gemma3 import Gemma3Adapter
from vislens.extract.adapters.idefics3 import Idefics3Adapter
from vislens.extract.adapters.instructblip import InstructBlipAdapter
from vislens.extract.adapters.llava import LlavaAdapter
from vislens.extract.adapters.llava_next import LlavaNextAdapter
from vislens.extract.adapters.llava_onevision import LlavaOnevisionAdapter
from vislens.extract.adapters.mllama import MllamaAdapter
from vislens.extract.adapters.qwen2_vl import Qwen2VLAdapter
from vislens.extract.adapters.smolvlm import SmolVLMAdapter

__all__ = [
    "Adapter",
    "AttentionShape",
    "NormSpec",
    "ADAPTERS",
    "adapter_class",
    "load_adapter",
    "LoadedModel",
    "resolve_device",
]

ADAPTERS: tuple[type[Adapter], ...] = (
    LlavaAdapter,
    InstructBlipAdapter,
    LlavaNextAdapter,
    Qwen2VLAdapter,
    Idefics3Adapter,
    Gemma3Adapter,
    LlavaOnevisionAdapter,
    MllamaAdapter,
    SmolVLMAdapter,
)
ADDING_DOC = "docs/models.md (section 'Adding a model family')"


def adapter_class(model_type: str) -> type[Adapter]:
    """The adapter class for a transformers ``model_type``.

    Raises
    ------
    UnsupportedModelError
        Listing the supported model types and the doc on adding one.
    """
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls
    supported = ", ".join(t for cls in ADAPTERS for t in cls.model_types)
    raise UnsupportedModelError(
        f"no vislens adapter for model_type {model_type!r}; supported: {supported}. To add a family, see {ADDING_DOC}."
    )


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for extraction, with where it came from."""

    adapter: Adapter
    name_or_path: str
    revision: str | None
    commit_hash: str | None


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` when a GPU is present, else ``cpu``; anything else is kept."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    try:
        return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]
    except KeyError:
        raise ValueError(f"dtype must be auto, float16, bfloat16 or float32, got {name!r}") from None


def _looks_like_a_path(name: str) -> bool:
    """Whether a --model value is meant as a folder rather than a hub id (``org/name``)."""
    return name.startswith(("/", "./", "../", "~", ".")) or name.endswith("/") or name.count("/") > 1 or "\\" in name


def check_model_source(name_or_path: str, revision: str | None = None, timeout: float = 10.0) -> None:
    """Fail fast, in one line, when a checkpoint cannot be loaded at all.

    A folder must exist and hold ``config.json``. A hub id must be in the local Hugging Face cache
    or the hub must answer once within ``timeout`` seconds (transformers would otherwise retry for
    half a minute with a warning per retry).

    Raises
    ------
    ModelError
        Naming the folder or hub id and the fix.
    """
    path = Path(name_or_path).expanduser()
    if path.exists() or _looks_like_a_path(name_or_path):
        if not path.exists():
            raise ModelError(
                f"model folder {name_or_path} does not exist; check the path (or pass a hub id such as llava-hf/llava-1.5-7b-hf)"
            )
        if not path.is_dir():
            raise ModelError(f"--model {name_or_path} is a file; pass the checkpoint's folder (holding config.json)")
        if not (path / "config.json").exists():
            raise ModelError(
                f"model folder {name_or_path} has no config.json; pass the folder that save_pretrained wrote"
            )
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name_or_path, "config.json", revision=revision), str):
        return  # in the local cache
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ModelError(
            f"{name_or_path} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; download it on a "
            "machine with network access (huggingface-cli download ...) and pass its folder, or copy the cache here"
        )
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(name_or_path, revision=revision, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - any failure to reach or find it is the same message
        reason = type(exc).__name__
        raise ModelError(
            f"cannot get {name_or_path} from the Hugging Face hub ({reason}) and it is not in the local cache: "
            "check the id, your network or HF_TOKEN for gated models, or download it elsewhere and pass its folder"
        ) from None


def load_adapter(
    name_or_path: str, *, device: str = "cpu", dtype: str = "auto", revision: str | None = None
) -> LoadedModel:
    """Load a checkpoint (folder or hub id) with eager attention and wrap it in its adapter.

    Raises
    ------
    UnsupportedModelError
        When the architecture has no adapter.
    ModelError
        When the checkpoint cannot be loaded with eager attention.
    """
    from transformers import AutoConfig

    check_model_source(name_or_path, revision)
    try:
        config = AutoConfig.from_pretrained(name_or_path, revision=revision)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot read a model config from {name_or_path!r}: {exc}. Pass a checkpoint folder "
            "(with config.json) or a hub id available offline in the Hugging Face cache."
        ) from None
    cls = adapter_class(config.model_type)
    torch_dtype = _dtype(dtype, device)
    try:
        model = cls.model_class().from_pretrained(
            name_or_path, revision=revision, dtype=torch_dtype, attn_implementation="eager"
        )
    except ValueError as exc:
        if "attn_implementation" in str(exc) or "eager" in str(exc):
            raise ModelError(
                f"{name_or_path!r} cannot run with eager attention, which norm-based attention "
                f"needs ({exc}); use a model class that supports attn_implementation='eager'"
            ) from None
        raise
    model = model.to(device).eval()
    processor = cls.load_processor(name_or_path, revision)
    commit = getattr(config, "_commit_hash", None)
    return LoadedModel(cls(model, processor), name_or_path, revision, commit)
