"""The extraction plan: which (image, prompt) pairs become which samples, and their sizes.

The plan is deterministic in the options, so every shard writer and every resumed run
computes the same one; its rows are part of the store's fingerprint.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vislens.errors import DataError
from vislens.extract.adapters.base import GENERIC_PLACEHOLDER, Adapter
from vislens.extract.config import ExtractConfig
from vislens.extract.datasets import DataSet, ImageRecord
from vislens.extract.images import image_size
from vislens.extract.prompts import KINDS, Prompt, noisy_prompt, noisy_prompts, normal_prompts


@dataclass(frozen=True)
class Sample:
    """One planned sample: an image under one prompt, formatted for the model."""

    index: int
    image_index: int
    record: ImageRecord
    prompt: Prompt
    text: str
    n_tokens: int
    n_image_tokens: int

    def row(self) -> tuple[str, ...]:
        """What identifies the sample in the fingerprint."""
        return (self.record.id, self.record.image, self.prompt.kind, self.prompt.id, self.prompt.text)


def prompt_kinds(config: ExtractConfig) -> tuple[str, ...]:
    """The requested prompt kinds, validated."""
    unknown = [k for k in config.prompts if k not in KINDS]
    if unknown or not config.prompts:
        raise DataError(f"unknown prompt kind(s) {unknown}; choose from {', '.join(KINDS)}")
    return tuple(dict.fromkeys(config.prompts))


def _prompts_for(
    i: int,
    kind: str,
    config: ExtractConfig,
    normal: list[Prompt],
    noisy: list[Prompt] | None,
    vocab: tuple[list[str], np.ndarray],
) -> list[Prompt]:
    if kind == "normal":
        return list(normal) if config.all_prompts else [normal[i % len(normal)]]
    if kind == "noisy":
        if noisy is not None:  # fixed strings from --noisy-prompts-file
            return list(noisy) if config.all_prompts else [noisy[i % len(noisy)]]
        return [noisy_prompt(vocab[0], vocab[1], config.noise_seed, i)]
    return [Prompt("empty", "empty", "")]


def make_plan(
    dataset: DataSet, config: ExtractConfig, adapter: Adapter, vocab: tuple[list[str], np.ndarray]
) -> list[Sample]:
    """Every sample of the extraction, image-major, with its planned token counts."""
    kinds = prompt_kinds(config)
    if config.prompt is not None:
        normal = [Prompt("normal", "custom", config.prompt)]
    else:
        normal = normal_prompts(config.prompts_file)
    noisy = noisy_prompts(config.noisy_prompts_file) if config.noisy_prompts_file else None
    placeholder = adapter.image_placeholder
    samples: list[Sample] = []
    for i, record in enumerate(dataset.records):
        size = None if adapter.fixed_image_tokens else image_size(record.image)
        for kind in kinds:
            for prompt in _prompts_for(i, kind, config, normal, noisy, vocab):
                if kind == "noisy":  # never an image placeholder (it would be read as a formatted prompt)
                    text = prompt.text.replace(placeholder, " ").replace(GENERIC_PLACEHOLDER, " ")
                    prompt = Prompt(prompt.kind, prompt.id, text)
                text = adapter.format_prompt(prompt.text)
                n, n_image = adapter.count_tokens(text, size or (336, 336))
                samples.append(Sample(len(samples), i, record, prompt, text, n, n_image))
    return samples


def query_capacity(samples: list[Sample], mode: str) -> int:
    """Query rows per sample the store must hold for an attention mode."""
    if mode == "none":
        return 0
    if mode == "last":
        return 1
    if mode == "all":
        return max(s.n_tokens for s in samples)
    return max(max(s.n_tokens - s.n_image_tokens for s in samples), 1)
