"""Stores extracted once per session from the tiny GQA LLaVA; tests that damage one copy it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vislens.extract import ExtractConfig, extract


def extract_config(model: Path, data: Path, out: str, **kwargs) -> ExtractConfig:
    """The extraction the store tests use (two prompt kinds, text attention)."""
    options = dict(prompts=("normal", "empty"), batch_size=3, progress=False, attention="text")
    options.update(kwargs)
    return ExtractConfig(model=str(model), data=str(data), out=out, **options)


@pytest.fixture(scope="session")
def store_path(toy_models, manifest, tmp_path_factory) -> Path:
    """A finished store of 12 samples (6 images x normal, empty)."""
    out = tmp_path_factory.mktemp("stores") / "s.zarr"
    extract(extract_config(toy_models["gqa"], manifest, str(out)))
    return out


@pytest.fixture
def store_copy(store_path, tmp_path) -> Path:
    """A private copy of the session store, free to damage."""
    target = tmp_path / "copy.zarr"
    shutil.copytree(store_path, target)
    return target
