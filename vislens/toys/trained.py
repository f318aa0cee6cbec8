"""The trained toys shipped inside the package: where they are, and what they are.

``vislens/toys/weights/<family>/`` holds a checkpoint written by `vislens.toys.train.train_toy`
(safetensors, tokenizer, processor, ``vislens_toy.json`` recording how it was trained), loaded
with ``from_pretrained`` like any other checkpoint.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from vislens.errors import ConfigError

TRAINED_FAMILIES = ("llava", "instructblip")


def trained_toy_path(family: str = "llava") -> Path:
    """The folder of the shipped trained toy of ``family`` (``llava`` or ``instructblip``).

    Raises
    ------
    ConfigError
        For another family, or when the weights are missing from the installation.
    """
    if family not in TRAINED_FAMILIES:
        raise ConfigError(f"no trained toy of family {family!r}; choose one of {', '.join(TRAINED_FAMILIES)}")
    path = Path(str(resources.files("vislens.toys").joinpath("weights", family)))
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ConfigError(
            f"the trained {family} toy is missing from {path}; reinstall vislens, or train it again with "
            f"`vislens toy train --family {family} --out {path}`"
        )
    return path


def trained_toy_record(family: str = "llava") -> dict[str, Any]:
    """``vislens_toy.json`` of the shipped trained toy: its spec, training config and report."""
    return json.loads((trained_toy_path(family) / "vislens_toy.json").read_text())


def load_trained_toy(family: str = "llava") -> tuple[Any, Any]:
    """(model, processor) of the shipped trained toy, in eval mode, fp32 on the CPU."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = trained_toy_path(family)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    return model, AutoProcessor.from_pretrained(path)
