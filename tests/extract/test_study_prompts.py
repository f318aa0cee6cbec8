"""The study's prompts on every family: all ten normal prompts, a noisy and the empty prompt.

Five of the study's ten normal prompts are fully formatted LLaVA prompts
(``"USER: <image>\\nWhat is the content of the image? ASSISTANT:"``); every family must take
them, with ``<image>`` standing for its own placeholder, and tell their instruction (the words
between the placeholder and ``ASSISTANT:``) from the template. One tiny random-init checkpoint
per family (two decoder layers), one image, ``--all-prompts``, batches of 4 that mix templated
and chat-templated prompts. Every sample's stored token ids are compared with the family's own
processor on the text a transformers user would write, and its ``instruction`` tokens with an
oracle that counts them without vislens: the processor is run on the text cut just before the
instruction and just after it; the instruction is the tokens from the first one the two encodings
disagree on to the end of the second (a token that straddles the boundary overlaps the
instruction and counts).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from vislens.extract import ExtractConfig, extract
from vislens.extract.adapters import llava_onevision, qwen2_vl, smolvlm
from vislens.extract.prompts import normal_prompts
from vislens.store import open_store
from vislens.store.schema import ROLE_BOS, ROLE_IMAGE, ROLE_INSTRUCTION
from vislens.toys import ToyInstructBlipSpec, ToySpec, build_toy_instructblip, build_toy_model
from vislens.toys.families import FAMILIES as VARIABLE_FAMILIES
from vislens.toys.families import build_toy_family
from vislens.toys.more_families import FAMILIES as MORE_FAMILIES
from vislens.toys.shapes import make_shapes

FAMILIES = ("llava", "instructblip", *VARIABLE_FAMILIES, *MORE_FAMILIES)
PLACEHOLDER = {  # what a transformers user writes for the image in a fully formatted prompt
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "gemma3": "<start_of_image>",
    "mllama": "<|image|>",
}
PROCESSOR = {
    "qwen2_vl": qwen2_vl.image_text_processor,
    "qwen2_5_vl": qwen2_vl.image_text_processor,
    "llava_onevision": llava_onevision.image_text_processor,
    "smolvlm": smolvlm.image_text_processor,
}
NESTED = ("gemma3", "mllama", "smolvlm")  # their processors read one list of images per sample


def build(family: str, path):
    """A tiny random-init checkpoint of ``family`` with a 2-layer decoder."""
    if family == "llava":
        return build_toy_model(path, ToySpec(layers=2))
    if family == "instructblip":
        return build_toy_instructblip(path, ToyInstructBlipSpec(layers=2, query_tokens=4))
    return build_toy_family(family, path, layers=2)


@pytest.fixture(scope="module")
def image_manifest(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("one-image"), n=1, start=2)


@pytest.fixture(scope="module", params=FAMILIES)
def extracted(request, image_manifest, tmp_path_factory):
    """(family, checkpoint, store): one image under the ten normal prompts, a noisy and the empty prompt."""
    family = request.param
    root = tmp_path_factory.mktemp(f"study-prompts-{family}")
    model = build(family, root / "model")
    out = root / "s.zarr"
    config = ExtractConfig(
        model=str(model),
        data=str(image_manifest),
        out=str(out),
        prompts=("normal", "noisy", "empty"),
        all_prompts=True,
        attention="none",
        batch_size=4,
        progress=False,
    )
    assert extract(config).written == 12
    return family, model, str(out)


def user_text(family: str, processor, prompt: str) -> str:
    """The formatted text a transformers user gives the processor for this prompt."""
    if "<image>" in prompt:  # the study's fully formatted LLaVA prompts
        if family == "instructblip":  # its processor inserts the image itself: the user drops <image>
            return re.sub(r"\s*<image>\s*", " ", prompt).strip()
        text = prompt.replace("<image>", PLACEHOLDER.get(family, "<image>"))
        bos = processor.tokenizer.bos_token
        return bos + text if family == "mllama" else text  # MllamaProcessor puts BOS before the text
    if not getattr(processor, "chat_template", None):
        return prompt
    content = [{"type": "image"}] + ([{"type": "text", "text": prompt}] if prompt else [])
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def processor_ids(family: str, processor, image: Image.Image, text: str) -> list[int]:
    """The processor's input ids for one image and a text (no BOS added where the text starts with one)."""
    bos = processor.tokenizer.bos_token
    extra = {"add_special_tokens": False} if bos and text.startswith(bos) else {}
    images = [[image]] if family in NESTED else [image]
    return processor(images=images, text=[text], return_tensors="pt", **extra)["input_ids"][0].tolist()


def instruction_text(prompt: str) -> str:
    """The instruction of a prompt: of a fully formatted one, the words between <image> and ASSISTANT:."""
    if "<image>" in prompt:
        return prompt.split("<image>", 1)[1].strip().removesuffix("ASSISTANT:").strip()
    return prompt.strip()


def oracle_positions(family: str, processor, image: Image.Image, full: str, prompt: str) -> np.ndarray:
    """Positions of the instruction's tokens, by counting (see the module docstring); empty for no instruction."""
    core = instruction_text(prompt)
    if not core:
        return np.zeros(0, dtype=np.int64)
    placeholder = PLACEHOLDER.get(family, "<image>")
    after = full.find(placeholder) + len(placeholder) if placeholder in full else 0
    start = full.find(core, after)
    assert start >= 0, (full, core)
    before = processor_ids(family, processor, image, full[:start])
    upto = processor_ids(family, processor, image, full[: start + len(core)])
    first = next((i for i, (a, b) in enumerate(zip(before, upto)) if a != b), len(before))
    return np.arange(first, len(upto))


def test_every_prompt_extracts_with_its_instruction_tokens_right(extracted, image_manifest):
    import json

    family, model, store = extracted
    processor = PROCESSOR[family]().from_pretrained(model) if family in PROCESSOR else None
    if processor is None:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(model)
    record = json.loads(image_manifest.read_text().splitlines()[0])
    image = Image.open(image_manifest.parent / record["image"]).convert("RGB")
    acts = open_store(store)["activations"].to_dataset().load()
    kinds = [str(k) for k in acts.prompt_kind.values]
    assert kinds == ["normal"] * 10 + ["noisy", "empty"]
    assert [str(t) for t in acts.prompt_text.values[:10]] == [p.text for p in normal_prompts()]
    for s in range(acts.sizes["sample"]):
        prompt = str(acts.prompt_text[s].values)
        n = int(acts.n_tokens[s])
        full = user_text(family, processor, prompt)
        ids = processor_ids(family, processor, image, full)
        np.testing.assert_array_equal(acts.token_id[s, :n].values, ids, err_msg=f"{family} sample {s}: {prompt!r}")
        roles = acts.token_role[s, :n].values
        expected = oracle_positions(family, processor, image, full, prompt)
        got = np.flatnonzero(roles == ROLE_INSTRUCTION)
        np.testing.assert_array_equal(got, expected, err_msg=f"{family} sample {s}: {prompt!r}")
        assert (roles[expected] != ROLE_IMAGE).all() and (roles == ROLE_BOS).sum() <= 1
        if kinds[s] == "empty":
            assert got.size == 0
        else:  # the instruction tokens spell the instruction (whitespace aside), and nothing of the template
            decoded = processor.tokenizer.decode([int(i) for i in acts.token_id[s, got].values])
            assert " ".join(decoded.split()) == " ".join(instruction_text(prompt).split()), (family, s, decoded)
