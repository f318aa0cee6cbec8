"""Toy vision LLMs: tiny checkpoints built from configs, for tests, trials and the demo.

- `vislens.toys.llava`: a random-init LLaVA-1.5-architecture checkpoint (`ToySpec`, `build_toy_model`).
- `vislens.toys.instructblip`: a random-init InstructBLIP (`ToyInstructBlipSpec`, `build_toy_instructblip`).
- `vislens.toys.families`: random-init LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Idefics3 (`build_toy_family`), and
  through it `vislens.toys.more_families`: Gemma-3, LLaVA-OneVision, Mllama, SmolVLM.
- `vislens.toys.cache`: any of them built once into vislens's cache (`toy_checkpoint`, `toy_model_path`).

Every builder gives the norms random, non-unit weights (`vislens.toys.norms`). Nothing in
`vislens.extract` imports this package at module level.
"""

from __future__ import annotations

from vislens.toys.cache import TOY_FAMILIES, toy_checkpoint, toy_model_path
from vislens.toys.families import build_toy_family
from vislens.toys.instructblip import ToyInstructBlipSpec, build_toy_instructblip
from vislens.toys.llava import TOY_VERSION, ToySpec, build_toy_model

__all__ = [
    "TOY_FAMILIES",
    "TOY_VERSION",
    "ToyInstructBlipSpec",
    "ToySpec",
    "build_toy_family",
    "build_toy_instructblip",
    "build_toy_model",
    "toy_checkpoint",
    "toy_model_path",
]
