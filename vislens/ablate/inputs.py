"""What an ablation scores: (image, prompt, caption) pairs, planned then encoded.

The input of a pair is the prompt in the model's chat template followed by the reference
caption (``Adapter.ablation_texts``; for LLaVA ``"USER: <image>\\n{prompt} ASSISTANT: {caption}"``)
and nothing after it. The scored tokens are those of the full text beyond the tokens of the
templated prompt alone; the loss is their mean cross-entropy (teacher forcing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vislens.ablate.engine import PairInput, image_span
from vislens.errors import DataError, ModelError
from vislens.extract.adapters.base import Adapter
from vislens.extract.datasets import DataSet, ImageRecord
from vislens.extract.images import image_size
from vislens.extract.prompts import Prompt
from vislens.store.schema import IMAGE, TEXT


@dataclass(frozen=True)
class PlannedPair:
    """One planned (image, prompt) pair with its texts and planned token counts."""

    sample: int
    prompt: int
    record: ImageRecord
    caption: str
    context: str
    text: str
    n_tokens: int
    n_image: int
    n_caption: int


def reference_caption(record: ImageRecord, index: int) -> str:
    """The ``index``-th reference caption of an image, stripped.

    Raises
    ------
    DataError
        If the image has no such caption, or it is empty.
    """
    if index >= len(record.captions) or index < -len(record.captions):
        raise DataError(
            f"image {record.id} has {len(record.captions)} reference caption(s), so no caption {index}; "
            "ablation scores a reference caption: add captions to the data set or lower --caption-index"
        )
    caption = record.captions[index].strip()
    if not caption:
        raise DataError(f"image {record.id}: reference caption {index} is empty; fill it in or remove the record")
    return caption


def plan_pairs(data: DataSet, prompts: list[Prompt], adapter: Adapter, caption_index: int = 0) -> list[PlannedPair]:
    """Every (image, prompt) pair, image-major, with token counts from the processor."""
    pairs = []
    for s, record in enumerate(data.records):
        caption = reference_caption(record, caption_index)
        size = (336, 336) if adapter.fixed_image_tokens else (image_size(record.image) or (336, 336))
        for p, prompt in enumerate(prompts):
            context, text = adapter.ablation_texts(prompt.text, caption)
            n_context, _ = adapter.count_tokens(context, size)
            n_tokens, n_image = adapter.count_tokens(text, size)
            if n_tokens <= n_context:
                raise DataError(f"image {record.id}: caption {caption!r} gives no tokens after prompt {prompt.id!r}")
            pairs.append(PlannedPair(s, p, record, caption, context, text, n_tokens, n_image, n_tokens - n_context))
    return pairs


def encode_pairs(adapter: Adapter, image: Image.Image, pairs: list[PlannedPair], device: str) -> list[PairInput]:
    """Encode the pairs of one image in one batch and embed them (image features in place).

    Raises
    ------
    ModelError
        If the processor pads on the left, the caption changes the prompt's tokens, or the
        token counts differ from the plan.
    """
    full = adapter.encode([image] * len(pairs), [p.text for p in pairs])
    context = adapter.encode([image] * len(pairs), [p.context for p in pairs])
    selected = adapter.ablation_inputs(full, context)
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in selected.items()}
    embeds = adapter.ablation_embeddings(inputs)
    rope = adapter.ablation_positions(inputs)
    valid = full["attention_mask"].bool()
    image_mask = adapter.image_mask(full).numpy()
    out = []
    for b, pair in enumerate(pairs):
        n = int(valid[b].sum())
        n_context = int(context["attention_mask"][b].sum())
        if not bool(valid[b, :n].all()):
            raise ModelError("the processor padded on the left; vislens needs right padding")
        ids = full["input_ids"][b, :n].numpy().astype(np.int64)
        if not np.array_equal(ids[:n_context], context["input_ids"][b, :n_context].numpy()):
            raise ModelError(
                f"image {pair.record.id}: appending the caption changes the tokens of the prompt; "
                "the scored caption tokens cannot be separated (override Adapter.ablation_texts)"
            )
        start, count = image_span(image_mask[b, :n], contiguous=adapter.contiguous_image_tokens)
        if n != pair.n_tokens or count != pair.n_image or n - n_context != pair.n_caption:
            raise ModelError(
                f"image {pair.record.id}: {n} tokens ({count} image, {n - n_context} caption) but the plan counted "
                f"{pair.n_tokens} ({pair.n_image}, {pair.n_caption}); the processor is not deterministic"
            )
        image_pos = None if adapter.contiguous_image_tokens else np.flatnonzero(image_mask[b, :n])
        out.append(PairInput(embeds[b, :n], ids, start, count, n_context, image_pos, rope[b, :, :n]))
    return out


def token_arrays(pair: PairInput) -> dict[str, np.ndarray]:
    """``token_id`` int32, ``modality`` uint8 and ``scored`` bool, each (token,), of a pair's full input."""
    n = pair.n_tokens
    modality = np.full(n, TEXT, dtype=np.uint8)
    modality[pair.image_pos] = IMAGE
    scored = np.zeros(n, dtype=bool)
    scored[pair.caption_start :] = True
    return {"token_id": pair.token_ids.astype(np.int32), "modality": modality, "scored": scored}
