"""A LayerNorm decoder, end to end: a tiny LLaVA whose language model is StableLM.

StableLM keeps Llama's module names (``layers``, ``norm``, ``self_attn.{q,k,v,o}_proj``) but
normalises with ``nn.LayerNorm`` (weight and bias) and can put biases on q, k and v, so b_V
enters every head output f_h(x_j) = (x_j W_V^h + b_V^h) W_O^h. Every LayerNorm weight and bias
and every qkv bias is set at random (non-unit, non-zero), so a lens or an attention computation
that drops a bias or assumes RMSNorm gives other numbers. Everything is checked against the
model's own forward, loaded directly with transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import assert_top1_matches, hidden_of, load_reference, run_reference
from vislens.extract import ExtractConfig, extract
from vislens.extract.adapters import load_adapter
from vislens.store import open_store

FP16 = dict(rtol=2e-3, atol=2e-3)


def build_layernorm_llava(path: Path, seed: int = 7) -> Path:
    """A tiny LLaVA (CLIP tower, 25 image tokens) with a 3-layer grouped-query StableLM decoder."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        StableLmConfig,
    )

    from vislens.toys.text import LLAVA_CHAT_TEMPLATE, build_toy_tokenizer, text_config_kwargs

    tokenizer = build_toy_tokenizer(512)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=30, patch_size=6
    )
    text = StableLmConfig(**text_config_kwargs(tokenizer, 64, 128, 3, heads=4, kv_heads=2), use_qkv_bias=True)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for module in model.model.language_model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.5 * torch.randn_like(module.weight))
                module.bias.copy_(torch.randn_like(module.bias))
            elif isinstance(module, torch.nn.Linear) and module.bias is not None:  # q, k, v
                module.bias.copy_(0.5 * torch.randn_like(module.bias))
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}),
        tokenizer=tokenizer,
        patch_size=6,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def layernorm_model(tmp_path_factory) -> Path:
    return build_layernorm_llava(tmp_path_factory.mktemp("layernorm") / "llava-stablelm")


@pytest.fixture(scope="module")
def reference(layernorm_model):
    """(model, processor) loaded directly with transformers."""
    return load_reference(layernorm_model)


@pytest.fixture(scope="module")
def store(layernorm_model, manifest, tmp_path_factory) -> str:
    """4 images x (normal, noisy, empty): 12 samples in batches of 5 of unequal lengths, text-query attention."""
    out = str(tmp_path_factory.mktemp("layernorm-store") / "s.zarr")
    config = ExtractConfig(
        model=str(layernorm_model),
        data=str(manifest),
        out=out,
        limit=4,
        prompts=("normal", "noisy", "empty"),
        batch_size=5,
        attention="text",
        progress=False,
    )
    assert extract(config).written == 12
    return out


@pytest.fixture(scope="module")
def own(store, reference, manifest):
    """Per stored sample: (inputs, outputs) of the model's own unbatched forward."""
    model, processor = reference
    acts = open_store(store)["activations"].to_dataset()
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    out = []
    for s in range(acts.sizes["sample"]):
        image = str(manifest.parent / records[int(acts.image_index[s])]["image"])
        out.append(run_reference(model, processor, image, str(acts.prompt_text[s].values), output_attentions=True))
    return out


def test_the_toy_has_random_layernorm_weights_and_biases(layernorm_model, reference, store):
    model, _ = reference
    decoder = model.model.language_model
    assert type(decoder).__name__ == "StableLmModel" and isinstance(decoder.norm, torch.nn.LayerNorm)
    assert (decoder.norm.weight - 1).abs().min() > 0 and decoder.norm.bias.abs().mean() > 0.5
    assert decoder.layers[0].self_attn.v_proj.bias.abs().mean() > 0.1
    spec = load_adapter(str(layernorm_model)).adapter.norm_spec()
    assert spec.kind == "layer" and spec.eps == decoder.norm.eps
    lens = open_store(store)["lens"].to_dataset()
    assert lens.attrs["norm_kind"] == "layer" and lens.attrs["norm_eps"] == pytest.approx(decoder.norm.eps)
    np.testing.assert_array_equal(lens["norm_weight"].values, decoder.norm.weight.detach().numpy())
    np.testing.assert_array_equal(lens["norm_bias"].values, decoder.norm.bias.detach().numpy())
    np.testing.assert_array_equal(lens["unembedding"].values, model.get_output_embeddings().weight.detach().numpy())


def test_hidden_states_equal_the_models_own(store, own):
    acts = open_store(store)["activations"].to_dataset().load()
    lengths = set()
    for s, (inputs, outputs) in enumerate(own):
        ref = hidden_of(outputs)
        n = ref.shape[1]
        lengths.add(n)
        assert int(acts.n_tokens[s]) == n
        np.testing.assert_allclose(acts.hidden[s, :, :n].values.astype(np.float32), ref, **FP16)
        np.testing.assert_array_equal(acts.token_id[s, :n].values, inputs["input_ids"][0].numpy())
    assert len(lengths) >= 3  # the batches mix samples of different lengths


def test_lens_values_equal_the_models_own_head_at_every_layer(store, own, reference):
    """Last layer: the stored state through the stored unembedding gives the model's own logits (it
    is already final-normed). Earlier layers: the lens's norm, from the store's lens arrays, is the
    model's own LayerNorm (weight and bias), so the lens logits are ``lm_head(norm(h_l))``."""
    from vislens.analyze.logit_lens import apply_norm

    model, _ = reference
    norm, head = model.model.language_model.norm, model.get_output_embeddings()
    tree = open_store(store)
    lens = tree["lens"].to_dataset()
    w_u = torch.from_numpy(lens["unembedding"].values.astype(np.float32))
    weight = torch.from_numpy(lens["norm_weight"].values.astype(np.float32))
    bias = torch.from_numpy(lens["norm_bias"].values.astype(np.float32))
    kind, eps = str(lens.attrs["norm_kind"]), float(lens.attrs["norm_eps"])
    acts = tree["activations"].to_dataset()
    with torch.no_grad():
        for s in (0, 1, 2, 7):
            _, outputs = own[s]
            n = outputs.logits.shape[1]
            stored = torch.from_numpy(acts.hidden[s, :, :n].values.astype(np.float32))  # (layer, token, hidden)
            logits = stored[-1] @ w_u.T
            scale = outputs.logits[0].abs().max()
            torch.testing.assert_close(logits, outputs.logits[0], rtol=0, atol=5e-3 * scale)
            states = torch.stack(outputs.hidden_states)[:, 0]
            for layer in range(len(states) - 1):
                ours = apply_norm(stored[layer], kind, eps, weight, bias) @ w_u.T
                theirs = head(norm(states[layer]))
                torch.testing.assert_close(ours, theirs, rtol=0, atol=5e-3 * theirs.abs().max())
            x = torch.randn(9, stored.shape[-1]) * 3 + 1
            torch.testing.assert_close(apply_norm(x, kind, eps, weight, bias), norm(x), rtol=1e-5, atol=1e-5)


def test_logit_lens_top1_equals_the_models_own_lm_head(store, own, reference):
    from vislens.analyze.logit_lens import logit_lens_topk

    model, _ = reference
    norm, head = model.model.language_model.norm, model.get_output_embeddings()
    tree = open_store(store)
    top = logit_lens_topk(tree, k=1).compute()
    acts = tree["activations"].to_dataset()
    compared = total = 0
    for s, (inputs, outputs) in enumerate(own):
        image = (inputs["input_ids"][0] == model.config.image_token_id).numpy()
        n = image.size
        assert (top[s].values[:, :n][:, ~image] == -1).all()
        ours = torch.from_numpy(top[s].values[:, :n][:, image, 0].astype(np.int64))
        stored = torch.from_numpy(acts.hidden[s].values[:, :n][:, image].astype(np.float32))
        states = torch.stack(outputs.hidden_states)[:, 0][:, image]
        done = assert_top1_matches(ours, stored, states, norm, head)
        compared, total = compared + done[0], total + done[1]
    assert compared / total > 0.5


def test_norm_attention_equals_the_models_own_per_head_outputs(store, own, reference):
    """NA(q, j) = |sum_h alpha^h_qj (v_j^h + b_V^h) W_O^h|, from the model's own v_proj outputs (bias
    included) and attention weights; the per-source contributions add up to the model's own o_proj
    output, which pins them to the model."""
    from vislens.analyze.norm_attention import norm_attention_per_sample

    model, _ = reference
    cfg = model.config.text_config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // heads
    layers = model.model.language_model.layers
    per = norm_attention_per_sample(open_store(store)).compute()
    for s in (0, 1, 2, 5):
        inputs, _ = own[s]
        captured: dict[str, torch.Tensor] = {}
        hooks = []
        for k, layer in enumerate(layers):
            for name in ("v", "o"):
                module = getattr(layer.self_attn, f"{name}_proj")
                keep = lambda m, i, o, key=f"{name}{k}": captured.__setitem__(key, o[0])  # noqa: E731
                hooks.append(module.register_forward_hook(keep))
        try:
            with torch.no_grad():
                out = model(**inputs, output_attentions=True)
        finally:
            for hook in hooks:
                hook.remove()
        ids = inputs["input_ids"][0].numpy()
        image = ids == model.config.image_token_id
        n = len(ids)
        text_q = np.flatnonzero(~image)
        with torch.no_grad():
            for k, layer in enumerate(layers):
                alpha = out.attentions[k][0]  # (H, N, N)
                v = captured[f"v{k}"].unflatten(-1, (kv, d)).repeat_interleave(heads // kv, dim=1)  # (N, H, d)
                moved = alpha.permute(1, 2, 0)[..., None] * v[None]  # (Q, N, H, d)
                contributions = moved.flatten(-2) @ layer.self_attn.o_proj.weight.T  # (Q, N, D)
                torch.testing.assert_close(contributions.sum(1), captured[f"o{k}"], rtol=1e-4, atol=1e-5)
                na = contributions.norm(dim=-1).numpy()  # (Q, N)
                np.testing.assert_allclose(per["last_query"][s, k, :n].values, na[n - 1], rtol=5e-3, atol=1e-5)
                shares = na[text_q][:, image].sum(-1) / na[text_q].sum(-1)
                np.testing.assert_allclose(float(per["image_share"][s, k]), shares.mean(), rtol=5e-3)
