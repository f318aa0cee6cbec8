"""What a toy VLLM has learned, measured directly on the model (no store): captions and the lens.

- `caption_f1`: greedy captions of held-out shapes-world scenes against their references
  (word F1, best reference per image, averaged over images).
- `lens_scores`: the logit lens on image tokens, top-1 ids taken from the model's own layers,
  scored by vislens's definition (`vislens.analyze.words.scores`: each image token's id decoded
  on its own, never joined with its neighbours): precision, token precision and recall per
  layer, averaged over images.

Words follow `vislens.analyze.words.words`: lowercase, maximal runs of letters and digits,
NLTK English stop words dropped; special tokens decode to no word. The training loop, the
findings tests and the model card use these functions; the card also runs vislens's own
analyses on stores.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vislens.analyze.words import Vocabulary, reference_words, scores, words
from vislens.toys.shapes import captions, render, scene

EVAL_PROMPT = "Briefly describe the content of the image:"
"""The study's first normal prompt; every evaluation uses it unless told otherwise."""


def word_f1(generated: str, references: Sequence[str]) -> float:
    """Best word F1 of ``generated`` over ``references`` (multisets of `words`; 0 when either is empty)."""
    got = Counter(words(generated))
    best = 0.0
    for reference in references:
        want = Counter(words(reference))
        common = sum((got & want).values())
        if common:
            precision, recall = common / sum(got.values()), common / sum(want.values())
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def held_out(n: int, start: int = 0) -> tuple[list[Any], list[list[str]]]:
    """Images (PIL) and reference captions of held-out scenes ``start .. start + n - 1``."""
    scenes = [scene("test", i) for i in range(start, start + n)]
    return [render(s) for s in scenes], [captions(s) for s in scenes]


def _adapter(model: torch.nn.Module, processor: Any) -> Any:
    from vislens.extract.adapters import adapter_class

    return adapter_class(model.config.model_type)(model, processor)


@torch.no_grad()
def greedy_captions(
    model: torch.nn.Module,
    processor: Any,
    images: list[Any],
    *,
    prompt: str = EVAL_PROMPT,
    max_new_tokens: int = 40,
    batch_size: int = 32,
) -> list[str]:
    """Greedy captions, one per image (the same prompt for all: no padding is needed)."""
    adapter = _adapter(model, processor)
    text = adapter.format_prompt(prompt)
    eos = adapter.tokenizer.eos_token_id
    out: list[str] = []
    model.eval()
    for b0 in range(0, len(images), batch_size):
        chunk = images[b0 : b0 + batch_size]
        inputs = adapter.encode(chunk, [text] * len(chunk))
        ids = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos
        )
        for row in ids[:, inputs["input_ids"].shape[1] :].tolist():  # generate returns prompt + new tokens
            if eos in row:
                row = row[: row.index(eos)]
            out.append(adapter.tokenizer.decode(row, skip_special_tokens=True).strip())
    return out


def caption_f1(model: torch.nn.Module, processor: Any, n: int = 64, *, start: int = 0) -> tuple[float, list[str]]:
    """Mean held-out word F1 of greedy captions over ``n`` scenes, and the captions."""
    images, refs = held_out(n, start)
    got = greedy_captions(model, processor, images)
    return float(np.mean([word_f1(g, r) for g, r in zip(got, refs, strict=True)])), got


@dataclass(frozen=True)
class LensScores:
    """Per-layer means over images: ``precision``, ``token_precision``, ``recall`` (layer,) float64.

    Layer 0 is the decoder's input (embeddings with the image features in place), layer L its output.
    """

    precision: np.ndarray
    token_precision: np.ndarray
    recall: np.ndarray

    @property
    def best_layer(self) -> int:
        """The layer of the highest recall."""
        return int(np.argmax(self.recall))


@torch.no_grad()
def lens_top1(model: torch.nn.Module, processor: Any, images: list[Any], *, prompt: str = EVAL_PROMPT) -> np.ndarray:
    """(image, layer, image token) int64 top-1 ids of ``lm_head(norm(h))`` (layer L: ``lm_head(h)``)."""
    adapter = _adapter(model, processor)
    model.eval()
    text = adapter.format_prompt(prompt)
    inputs = adapter.encode(images, [text] * len(images))
    states = adapter.hidden_states(adapter.forward(inputs))
    mask = adapter.image_mask(inputs)
    head, norm = model.get_output_embeddings(), adapter.final_norm
    top = []
    for layer, h in enumerate(states):
        x = h if layer == len(states) - 1 else norm(h)
        ids = head(x).argmax(-1)  # (image, token)
        top.append(torch.stack([row[m] for row, m in zip(ids, mask, strict=True)]))
    return torch.stack(top, dim=1).numpy()


def lens_scores(
    model: torch.nn.Module, processor: Any, n: int = 48, *, start: int = 0, prompt: str = EVAL_PROMPT
) -> LensScores:
    """Logit-lens scores per layer on ``n`` held-out scenes, per-token rule (see the module docstring)."""
    images, refs = held_out(n, start)
    top = lens_top1(model, processor, images, prompt=prompt)
    vocabulary = Vocabulary.build(*_adapter(model, processor).vocabulary())
    per_image = np.stack([scores(top[i][..., None], vocabulary, reference_words(refs[i])) for i in range(n)])
    mean = per_image.mean(0)
    return LensScores(mean[:, 0], mean[:, 1], mean[:, 2])
