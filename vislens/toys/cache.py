"""Toy checkpoints built once into vislens's cache and reused afterwards."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from vislens.cache import default_cache_dir
from vislens.errors import ConfigError
from vislens.toys.llava import TOY_VERSION, ToySpec, build_toy_model

TOY_FAMILIES = ("llava", "instructblip", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3")
TOY_FAMILIES += ("gemma3", "llava_onevision", "mllama", "smolvlm")


def cached_build(path: Path, build: Callable[[Path], object]) -> Path:
    """Build a checkpoint into ``path`` once (atomically, via a temporary folder) and reuse it."""
    if (path / "config.json").exists() and (path / "vislens_toy.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".building-"))
    try:
        build(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def toy_model_path(spec: ToySpec = ToySpec(), cache_dir: Path | None = None) -> Path:
    """Build the random-init toy LLaVA once and return its folder (reused afterwards)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = "-".join(f"{k}{v}" for k, v in asdict(spec).items())
    return cached_build(cache_dir / f"toy-llava-v{TOY_VERSION}-{key}", lambda tmp: build_toy_model(tmp, spec))


def toy_checkpoint(family: str = "llava", cache_dir: Path | None = None) -> Path:
    """A tiny random-init checkpoint of any supported family, built once into the cache.

    Raises
    ------
    ConfigError
        For a family without a toy builder.
    """
    if family == "llava":
        return toy_model_path(cache_dir=cache_dir)
    if family not in TOY_FAMILIES:
        raise ConfigError(f"no toy checkpoint for family {family!r}; choose one of {', '.join(TOY_FAMILIES)}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if family == "instructblip":
        from vislens.toys.instructblip import build_toy_instructblip

        build: Callable[[Path], object] = build_toy_instructblip
    else:
        from vislens.toys.families import build_toy_family

        def build(tmp: Path) -> object:
            return build_toy_family(family, tmp)

    return cached_build(cache_dir / f"toy-{family}-v{TOY_VERSION}", build)
