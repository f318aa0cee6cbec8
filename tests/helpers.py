"""Independent references for the tests: the model's own outputs, computed plainly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor


def load_reference(model_path: Path):
    """The checkpoint loaded directly with transformers (eager attention, fp32)."""
    model = AutoModelForImageTextToText.from_pretrained(model_path, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(model_path)
    return model, processor


def chat_text(processor, prompt: str) -> str:
    """The prompt in the chat template, as a user of transformers would write it."""
    if "<image>" in prompt:
        return prompt
    content = [{"type": "image"}] + ([{"type": "text", "text": prompt}] if prompt else [])
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def run_reference(model, processor, image_path: str, prompt: str, **kwargs):
    """One unbatched forward: (inputs, outputs) with hidden states."""
    image = Image.open(image_path).convert("RGB")
    inputs = processor(images=[image], text=[chat_text(processor, prompt)], return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs, output_hidden_states=True, **kwargs)
    return inputs, outputs


def hidden_of(outputs) -> np.ndarray:
    """(layer, token, hidden) float32 of a batch of one."""
    return torch.stack(outputs.hidden_states)[:, 0].float().numpy()
