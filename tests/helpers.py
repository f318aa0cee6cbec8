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
    """The prompt in the chat template (if the processor has one), as a user of transformers would write it."""
    if "<image>" in prompt or not getattr(processor, "chat_template", None):
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


def instruction_positions(processor, prompt: str, input_ids, image_token_id: int) -> np.ndarray:
    """Positions of the instruction's tokens in one sample's input, found independently of vislens.

    By counting: the chat text is cut just before and just after the instruction, both prefixes
    are tokenized, and the instruction is the tokens from the first one they disagree on (a token
    that straddles the boundary, such as InstructBLIP's lone ``▁`` after BOS, overlaps the instruction and counts) to
    the end of the second, shifted by the image placeholder's expansion. A fully formatted LLaVA prompt (``USER: <image>\\n... ASSISTANT:``)
    has the words between the placeholder and ``ASSISTANT:`` as its instruction. Empty for the
    empty prompt.
    """
    if not prompt.strip():
        return np.zeros(0, dtype=np.int64)
    full = chat_text(processor, prompt)
    core = prompt.split("<image>")[1].strip().removesuffix("ASSISTANT:").strip() if "<image>" in prompt else prompt
    start = full.find(core, full.find("<image>") + 1)
    tok = processor.tokenizer
    before = tok(full[:start])["input_ids"]
    upto = tok(full[: start + len(core)])["input_ids"]
    ids = np.asarray(input_ids).ravel()
    shift = int((ids == image_token_id).sum()) - before.count(image_token_id)
    first = next((i for i, (a, b) in enumerate(zip(before, upto)) if a != b), len(before))
    return np.arange(first, len(upto)) + shift


def assert_instruction_roles(acts, s: int, tokenizer) -> None:
    """The tokens stored with role ``instruction`` decode to the sample's prompt text (whitespace
    collapsed; of a fully formatted prompt, the words between ``<image>`` and ``ASSISTANT:``), BOS
    is never one of them, and the empty prompt has none."""
    from vislens.store.schema import ROLE_BOS, ROLE_INSTRUCTION

    roles = acts.token_role[s].values
    ids = acts.token_id[s].values[roles == ROLE_INSTRUCTION]
    prompt = str(acts.prompt_text[s].values)
    if "<image>" in prompt:  # a fully formatted LLaVA prompt: the words between <image> and ASSISTANT:
        prompt = prompt.split("<image>")[1].strip().removesuffix("ASSISTANT:")
    prompt = " ".join(prompt.split())
    decoded = " ".join(tokenizer.decode([int(i) for i in ids]).split())
    assert decoded == prompt, (s, decoded, prompt)
    assert (roles == ROLE_BOS).sum() <= 1 and not (
        acts.token_id[s].values[roles == ROLE_INSTRUCTION] == tokenizer.bos_token_id
    ).any()


def decoder_of(model):
    """The language decoder (``layers``, ``norm``) at the path transformers 5.x gives it."""
    if model.config.model_type == "instructblip":
        return model.language_model.model
    if model.config.model_type in ("idefics3", "smolvlm"):
        return model.model.text_model
    return model.model.language_model


def image_of(model, inputs) -> np.ndarray:
    """(token,) bool: the image tokens of a batch of one, by the model's own image token id."""
    return (inputs["input_ids"][0] == model.config.image_token_id).numpy()


def assert_lens_top1_equals_lm_head(tree, model, own) -> None:
    """The store's logit-lens top-1 ids against the model's own ``lm_head(norm(h))`` per sample
    (``own``: (inputs, hidden states) per stored sample); text tokens must not be decoded."""
    from vislens.analyze.logit_lens import logit_lens_topk

    top = logit_lens_topk(tree, k=1).compute()
    acts = tree["activations"].to_dataset()
    norm, head = decoder_of(model).norm, model.get_output_embeddings()
    compared = total = 0
    for s, (inputs, hidden) in enumerate(own):
        image = image_of(model, inputs)
        assert (top[s].values[:, : image.size][:, ~image] == -1).all()  # text tokens are not decoded
        ours = torch.from_numpy(top[s].values[:, : image.size][:, image, 0].astype(np.int64))
        stored = torch.from_numpy(acts.hidden[s].values[:, : image.size][:, image].astype(np.float32))
        done = assert_top1_matches(ours, stored, torch.from_numpy(hidden[:, image]), norm, head)
        compared, total = compared + done[0], total + done[1]
    assert compared / total > 0.5


def lm_outputs(outputs):
    """The language model's outputs: InstructBLIP nests them under ``language_model_outputs``."""
    nested = getattr(outputs, "language_model_outputs", None)
    return outputs if nested is None else nested


def hidden_of(outputs) -> np.ndarray:
    """(layer, token, hidden) float32 of a batch of one."""
    return torch.stack(lm_outputs(outputs).hidden_states)[:, 0].float().numpy()


def assert_top1_matches(ours: torch.Tensor, stored: torch.Tensor, states: torch.Tensor, norm, head) -> tuple[int, int]:
    """Check logit-lens top-1 ids against the model's own ``head(norm(h))`` (last layer: ``head(h)``, already normed).

    ``ours`` (layer, token) int64; ``stored`` (layer, token, hidden) the stored fp16 states as float32;
    ``states`` (layer, token, hidden) the model's own fp32 states. Two references: (a) on ``stored``
    every position must agree unless its top-2 margin is a tie (1e-4); (b) on ``states`` every
    position whose top-2 margin exceeds what fp16 rounding of h can move must agree.
    Returns (positions compared in (b), positions).
    """
    w_norm = head.weight.norm(dim=-1).max()
    compared = total = 0
    with torch.no_grad():
        for layer in range(len(states)):
            last = layer == len(states) - 1
            best = head(stored[layer] if last else norm(stored[layer])).topk(2, dim=-1)
            exact = (best.values[:, 0] - best.values[:, 1]) > 1e-4
            assert torch.equal(ours[layer][exact], best.indices[exact, 0]), layer
            x = states[layer] if last else norm(states[layer])
            best = head(x).topk(2, dim=-1)
            bound = 2 * w_norm * x.norm(dim=-1) * 2.0**-10  # logit change from fp16 rounding of h
            clear = (best.values[:, 0] - best.values[:, 1]) > bound
            assert torch.equal(ours[layer][clear], best.indices[clear, 0]), layer
            compared += int(clear.sum())
            total += clear.numel()
    return compared, total


def self_signed_certificate(folder: Path, ip: str) -> tuple[Path, Path]:
    """A self-signed TLS certificate for one IP address: (certificate PEM, key PEM)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def extract_stores(models: dict, manifest: Path, root: Path, batches: tuple[tuple[int, str], ...], per_store: int):
    """One store per (model key, batch size) with prompts normal, noisy and empty, extracted with
    the given (batch size, attention) pairs; each must write ``per_store`` samples."""
    from vislens.extract import ExtractConfig, extract

    out = {}
    for key, model in models.items():
        for batch_size, attention in batches:
            path = str(root / f"{key}-{batch_size}.zarr")
            config = ExtractConfig(
                model=str(model),
                data=str(manifest),
                out=path,
                prompts=("normal", "noisy", "empty"),
                batch_size=batch_size,
                attention=attention,
                progress=False,
            )
            assert extract(config).written == per_store
            out[key, batch_size] = path
    return out
