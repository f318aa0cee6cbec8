"""Gemma-3, LLaVA-OneVision, Mllama and SmolVLM end to end, against the model's own forward.

Tiny random-init checkpoints (`vislens.toys.more_families`) saved with ``save_pretrained`` and
loaded back through `load_adapter`; four images of different sizes. The reference inputs are
what a user of transformers gets from ``processor.apply_chat_template(..., tokenize=True)``
(one image per sample), or for the study's LLaVA-style prompts the processor on the prompt with
``<image>`` written as the family's placeholder; the references' models are loaded directly with
transformers (LLaVA-OneVision's and SmolVLM's processors without their video processors, which
need torchvision).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from tests.ablate.conftest import LOSS_TOL, SHORT, pairs_of
from tests.ablate.test_engine import _run
from tests.analyze.test_cosine import brute_force as cosine_brute_force
from tests.helpers import (
    assert_instruction_roles,
    assert_lens_top1_equals_lm_head,
    decoder_of,
    extract_stores,
    hidden_of,
    image_of,
)
from vislens.ablate import AblateConfig, ablate, naive_losses, shared_prefix_losses
from vislens.analyze import cosine_per_sample, norm_attention
from vislens.analyze.norm_attention import norm_attention_per_sample
from vislens.analyze.report import write_report
from vislens.errors import ModelError
from vislens.extract import ExtractConfig, extract
from vislens.extract.adapters import adapter_class, llava_onevision, load_adapter, smolvlm
from vislens.extract.prompts import Prompt
from vislens.store import DONE, IMAGE, PADDING, TEXT, open_store
from vislens.toys.families import build_toy_family
from vislens.toys.more_families import FAMILIES
from vislens.toys.shapes import make_shapes

SIZES = [(64, 64), (96, 48), (40, 80), (48, 64)]  # (width, height)
FP16 = dict(rtol=2e-3, atol=2e-3)
EMPTY = Prompt("empty", "empty", "")
PLACEHOLDER = {"gemma3": "<start_of_image>", "llava_onevision": "<image>", "mllama": "<|image|>", "smolvlm": "<image>"}
PROCESSOR = {"llava_onevision": llava_onevision.image_text_processor, "smolvlm": smolvlm.image_text_processor}
VARIABLE = ("llava_onevision", "smolvlm")  # image tokens depend on the image size
ABLATED = ("gemma3", "llava_onevision", "smolvlm")  # Mllama's image is not in the sequence


@pytest.fixture(scope="module")
def sized_manifest(tmp_path_factory):
    """Four synthetic images resized to `SIZES`."""
    manifest = make_shapes(tmp_path_factory.mktemp("sized"), n=len(SIZES), start=5)
    for line, size in zip(manifest.read_text().splitlines(), SIZES):
        path = manifest.parent / json.loads(line)["image"]
        Image.open(path).convert("RGB").resize(size).save(path)
    return manifest


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One tiny checkpoint per family."""
    root = tmp_path_factory.mktemp("more-families")
    return {family: build_toy_family(family, root / family, seed=10 + i) for i, family in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def refs(models):
    """(model, processor) per family, loaded directly with transformers."""
    out = {}
    for family, path in models.items():
        model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager").eval()
        processor = (PROCESSOR[family]() if family in PROCESSOR else AutoProcessor).from_pretrained(path)
        out[family] = (model, processor)
    return out


def reference_inputs(family: str, processor, image: Image.Image, prompt: str) -> dict:
    """The inputs a transformers user gives the model for this image and prompt."""
    if "<image>" in prompt:  # the study's fully formatted LLaVA prompts
        text = prompt.replace("<image>", PLACEHOLDER[family])
        if family == "mllama":
            text = processor.tokenizer.bos_token + text  # where MllamaProcessor itself would put it
        return encode_text(processor, image, text)
    content = [{"type": "image", "image": image}] + ([{"type": "text", "text": prompt}] if prompt else [])
    return dict(
        processor.apply_chat_template(
            [{"role": "user", "content": content}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
    )


@pytest.fixture(scope="module")
def stores(models, sized_manifest, tmp_path_factory):
    """Per (family, batch size): 4 images x (normal, noisy, empty); batch 4 also captures text-query attention."""
    root = tmp_path_factory.mktemp("more-family-stores")
    return extract_stores(models, sized_manifest, root, ((1, "none"), (4, "text")), 3 * len(SIZES))


@pytest.fixture(scope="module")
def own(stores, refs, sized_manifest):
    """Per family and stored sample: (inputs, hidden (layer, token, hidden) float32) of the model's own forward."""
    records = [json.loads(line) for line in sized_manifest.read_text().splitlines()]
    out = {}
    for family in FAMILIES:
        acts = open_store(stores[family, 4])["activations"].to_dataset()
        model, processor = refs[family]
        out[family] = []
        for s in range(acts.sizes["sample"]):
            image = Image.open(sized_manifest.parent / records[int(acts.image_index[s])]["image"]).convert("RGB")
            inputs = reference_inputs(family, processor, image, str(acts.prompt_text[s].values))
            with torch.no_grad():
                outputs = model(**inputs, output_hidden_states=True)
            out[family].append((inputs, hidden_of(outputs)))
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch_size", [1, 4])
def test_hidden_states_and_image_positions_equal_the_models_own(stores, refs, own, family, batch_size):
    tree = open_store(stores[family, batch_size])
    acts = tree["activations"].to_dataset().load()
    model, _ = refs[family]
    assert tree.attrs["model"]["family"] == adapter_class(model.config.model_type).family == family
    assert acts.sizes["layer"] == model.config.text_config.num_hidden_layers + 1
    counts = []
    for s, (inputs, ref) in enumerate(own[family]):
        n = ref.shape[1]
        assert int(acts.n_tokens[s]) == n
        np.testing.assert_allclose(acts.hidden[s, :, :n].values.astype(np.float32), ref, **FP16)
        np.testing.assert_array_equal(acts.token_id[s, :n].values, inputs["input_ids"][0].numpy())
        image = image_of(model, inputs)
        np.testing.assert_array_equal(acts.modality[s, :n].values, np.where(image, IMAGE, TEXT))
        assert (acts.modality[s, n:].values == PADDING).all() and (acts.token_id[s, n:].values == -1).all()
        counts.append(int(image.sum()))
        grid = [4, 4] if family == "gemma3" else [0, 0]  # Gemma's 16 pooled tokens are a 4 x 4 grid
        np.testing.assert_array_equal(acts.image_grid[s].values, grid)
    assert (len(set(counts[:4])) > 1) == (family in VARIABLE)  # the first batch of 4 mixes image sizes
    assert set(counts) == ({1} if family == "mllama" else {16} if family == "gemma3" else set(counts))
    assert (acts.done.values == DONE).all()
    layer = acts["layer"].attrs
    assert layer["final_norm_applied_to_last"] == 1 and "0.00e+00 for lm_head(h_L)" in layer["final_norm_check"]


def test_gemma3_reads_its_norm_embedding_scale_and_bidirectional_image_block(models, refs, own):
    adapter = load_adapter(str(models["gemma3"])).adapter
    model, _ = refs["gemma3"]
    spec = adapter.norm_spec()
    norm = decoder_of(model).norm
    assert spec.kind == "rms_offset" and not np.allclose(spec.weight, 0)  # random, non-unit (1 + w)
    x = torch.randn(5, model.config.text_config.hidden_size)
    from vislens.analyze.logit_lens import apply_norm

    torch.testing.assert_close(apply_norm(x, spec.kind, spec.eps, torch.from_numpy(spec.weight), None), norm(x))
    assert model.config.text_config.final_logit_softcapping is None
    inputs, hidden = own["gemma3"][0]
    ids = inputs["input_ids"][0]
    text = ~torch.from_numpy(image_of(model, inputs))
    scale = model.config.text_config.hidden_size**0.5  # hidden state 0 carries the embedding scale
    torch.testing.assert_close(
        torch.from_numpy(hidden[0][text.numpy()]), decoder_of(model).embed_tokens.weight[ids[text]] * scale
    )
    # the image block is bidirectional: changing the last image token changes the first one's next state
    assert adapter.image_attention_bidirectional
    with torch.no_grad():
        embeds = torch.from_numpy(hidden[0])[None].clone()
        first, last = np.flatnonzero(image_of(model, inputs))[[0, -1]]
        kwargs = dict(token_type_ids=inputs["token_type_ids"], output_hidden_states=True)
        before = model(inputs_embeds=embeds, **kwargs).hidden_states[1][0, first]
        embeds[0, last] += 1.0
        after = model(inputs_embeds=embeds, **kwargs).hidden_states[1][0, first]
    assert not torch.allclose(before, after)


def test_mllama_image_reaches_the_text_through_cross_attention_only(refs, own):
    """Another image changes no hidden state before the cross-attention layer (index 1) and the states
    of the tokens from ``<|image|>`` on after it: the toy's gates are open, the image is not in the sequence."""
    model, processor = refs["mllama"]
    inputs, hidden = own["mllama"][0]
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)  # sample 0's image is 64 x 64
    other = processor(images=[[Image.fromarray(noise)]], text=["<|image|>"], return_tensors="pt")
    assert torch.equal(other["aspect_ratio_ids"], inputs["aspect_ratio_ids"])
    with torch.no_grad():
        changed = hidden_of(model(**dict(inputs, pixel_values=other["pixel_values"]), output_hidden_states=True))
    image = int(np.flatnonzero(image_of(model, inputs))[0])
    np.testing.assert_array_equal(changed[:2], hidden[:2])  # embeddings and the self-attention layer 0
    assert (np.abs(changed[2, image:] - hidden[2, image:]).max(-1) > 1e-3).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_counts_and_special_tokens(models, family):
    adapter = load_adapter(str(models[family])).adapter
    assert adapter.family == family and adapter.fixed_image_tokens == (family not in VARIABLE)
    text = adapter.format_prompt("Describe the image.")
    counts = {adapter.count_tokens(text, size)[1] for size in SIZES}
    assert counts == ({1} if family == "mllama" else {16} if family == "gemma3" else counts)
    assert (len(counts) > 1) == (family in VARIABLE)
    # the study's LLaVA-style prompts keep their own template and get the family's placeholder
    templated = adapter.format_prompt("USER: <image>\nWhat is it? ASSISTANT:")
    assert "USER: " + PLACEHOLDER[family] in templated and adapter.count_tokens(templated, SIZES[0])[1] in counts
    assert adapter.count_tokens(adapter.format_prompt(""), SIZES[0])[1] in counts
    ids = adapter.encode([Image.new("RGB", SIZES[0])], [text])["input_ids"][0].tolist()
    bos = adapter.tokenizer.bos_token_id
    assert ids.count(bos) == (1 if bos is not None else 0)  # never a second BOS from the template
    texts, special = adapter.vocabulary()
    assert len(texts) == len(special) == adapter.unembedding.shape[0]
    if family == "mllama":  # <|image|> is an input-only token, beyond lm_head's rows
        assert adapter.image_token_id == adapter.unembedding.shape[0]
        assert adapter.cross_attention_layers == (1,)
    else:
        assert special[adapter.image_token_id]
    if family == "smolvlm":
        assert special[adapter.tokenizer.convert_tokens_to_ids("<row_1_col_1>")]


BREAK = {  # a processor whose placeholder count disagrees with the model's image features
    "gemma3": lambda p: setattr(p, "full_image_sequence", p.full_image_sequence.replace("<image_soft_token>", "", 1)),
    "llava_onevision": lambda p: setattr(p, "num_image_tokens", 9),
    "smolvlm": lambda p: setattr(p, "image_seq_len", 5),
}


@pytest.mark.parametrize("family", sorted(BREAK))
def test_a_wrong_placeholder_count_is_an_error(models, sized_manifest, family, tmp_path):
    loaded = load_adapter(str(models[family]))
    BREAK[family](loaded.adapter.processor)
    config = ExtractConfig(
        model=str(models[family]), data=str(sized_manifest), out=str(tmp_path / "s.zarr"), progress=False
    )
    with pytest.raises(ModelError, match=r"image placeholders \[\d+\] do not match the image features"):
        extract(config, loaded=loaded)
    assert not (tmp_path / "s.zarr").exists()


def test_gemma3_refuses_pan_and_scan(models):
    loaded = load_adapter(str(models["gemma3"]))
    processor = loaded.adapter.processor
    processor.image_processor.do_pan_and_scan = True
    with pytest.raises(ModelError, match="do_pan_and_scan"):
        type(loaded.adapter)(loaded.adapter.model, processor)


@pytest.mark.parametrize("family", FAMILIES)
def test_logit_lens_top1_equals_the_models_own_lm_head(stores, refs, own, family):
    assert_lens_top1_equals_lm_head(open_store(stores[family, 4]), refs[family][0], own[family])


@pytest.mark.parametrize("family", FAMILIES)
def test_cosine_and_instruction_roles_equal_brute_force(stores, refs, own, family):
    tree = open_store(stores[family, 4])
    ours = cosine_per_sample(tree, text_tokens="all").compute()
    acts = tree["activations"].to_dataset()
    for s, (inputs, hidden) in enumerate(own[family]):
        assert_instruction_roles(acts, s, refs[family][1].tokenizer)
        image = image_of(refs[family][0], inputs)
        for layer, h in enumerate(hidden):
            expected = [
                cosine_brute_force(h[image], h[~image]),
                cosine_brute_force(h[image], h[image], True),  # NaN for Mllama's single image token
                cosine_brute_force(h[~image], h[~image], True),
            ]
            got = [float(ours[name][s, layer]) for name in ("inter_modal", "intra_image", "intra_text")]
            np.testing.assert_allclose(got, expected, atol=2e-3, err_msg=f"sample {s} layer {layer}")
        assert np.isnan(float(ours["intra_image"][s, 0])) == (family == "mllama")


def norm_attention_brute_force(model, inputs) -> np.ndarray:
    """Per decoder layer: NA(q, j) = |sum_h alpha^h_qj f_h(x_j)| for all q, j, materialised literally from
    the model's own attention weights, v_proj outputs and o_proj; the moved vectors summed over j must
    equal the model's own attention output (o_proj's output). NaN for cross-attention layers."""
    layers = decoder_of(model).layers
    cfg = model.config.text_config
    cross = set(getattr(cfg, "cross_attention_layers", None) or [])
    values, outputs = {}, {}
    hooks = []
    for k, layer in enumerate(layers):
        if k in cross:
            continue
        attn = layer.self_attn
        hooks.append(attn.v_proj.register_forward_hook(lambda m, i, o, k=k: values.__setitem__(k, o[0])))
        hooks.append(attn.o_proj.register_forward_hook(lambda m, i, o, k=k: outputs.__setitem__(k, o[0])))
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
    finally:
        for hook in hooks:
            hook.remove()
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    n = inputs["input_ids"].shape[1]
    result = []
    with torch.no_grad():
        for k, layer in enumerate(layers):
            if k in cross:
                result.append(torch.full((n, n), float("nan")))
                continue
            alpha = out.attentions[k][0]  # (H, N, N)
            w_o = layer.self_attn.o_proj.weight  # (D, H d)
            f = torch.stack(
                [
                    values[k][:, (h // (heads // kv)) * d : (h // (heads // kv) + 1) * d]
                    @ w_o[:, h * d : (h + 1) * d].T
                    for h in range(heads)
                ]
            )  # (H, N, D)
            moved = (alpha[:, :, :, None] * f[:, None, :, :]).sum(0)  # (Nq, Nj, D)
            torch.testing.assert_close(moved.sum(1), outputs[k], rtol=1e-4, atol=1e-5)  # the model's own output
            result.append(moved.norm(dim=-1))
    return torch.stack(result).numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_norm_attention_equals_the_models_own_attention_outputs(stores, refs, own, family):
    per = norm_attention_per_sample(open_store(stores[family, 4])).compute()
    model = refs[family][0]
    cross = np.isin(np.arange(model.config.text_config.num_hidden_layers), [1] if family == "mllama" else [])
    for s in (0, 1, 2, 4, 8):  # normal, noisy and empty prompts of images of different sizes
        inputs = own[family][s][0]
        na = norm_attention_brute_force(model, inputs)  # (layer, query, key)
        n = na.shape[1]
        np.testing.assert_allclose(per["last_query"][s, :, :n].values, na[:, n - 1, :], rtol=5e-3, atol=1e-5)
        image = image_of(model, inputs)
        text_q = np.flatnonzero(~image)
        shares = na[:, text_q][:, :, image].sum(-1) / na[:, text_q].sum(-1)
        np.testing.assert_allclose(per["image_share"][s].values, shares.mean(-1), rtol=5e-3)
        assert (
            np.isnan(per["image_share"][s].values[cross]).all()
            and np.isfinite(per["image_share"][s].values[~cross]).all()
        )
        after = np.isin(text_q, text_q[text_q > np.argmax(image)])
        np.testing.assert_allclose(per["image_share_after_image"][s].values, shares[:, after].mean(-1), rtol=5e-3)


def encode_text(processor, image: Image.Image, text: str) -> dict:
    """The processor on a formatted text, adding no BOS where the text starts with one (transformers' rule)."""
    bos = processor.tokenizer.bos_token
    extra = {"add_special_tokens": False} if bos and text.startswith(bos) else {}
    return dict(processor(images=[[image]], text=[text], return_tensors="pt", **extra))


def own_losses(family, model, processor, plan, starts, stops) -> np.ndarray:
    """(setting, caption_token) cross-entropies of the model's own forward on each truly ablated input
    (``remove`` style: the removed span left out of its own input embeddings, and out of Gemma's
    ``token_type_ids``, so its kept image tokens form one bidirectional block), each mean checked
    against the model's own ``labels`` loss."""
    image = Image.open(plan.record.image).convert("RGB")
    full, context = (encode_text(processor, image, text) for text in (plan.text, plan.context))
    n_context = context["input_ids"].shape[1]
    ids = full["input_ids"][0]
    image_pos = torch.nonzero(ids == model.config.image_token_id).flatten()
    rows = []
    with torch.no_grad():
        embeds = model(**full, output_hidden_states=True).hidden_states[0][0]
        for s, e in zip(starts, stops):
            removed = torch.zeros(len(ids), dtype=torch.bool)
            if e > s:
                removed[int(image_pos[s]) : int(image_pos[e - 1]) + 1] = True
            labels = ids.clone()
            labels[:n_context] = -100
            extra = {"token_type_ids": full["token_type_ids"][:, ~removed]} if family == "gemma3" else {}
            out = model(inputs_embeds=embeds[~removed][None], labels=labels[~removed][None], **extra)
            before = torch.arange(n_context, len(ids)) - 1 - int(removed.sum())
            losses = torch.nn.functional.cross_entropy(out.logits[0, before].float(), ids[n_context:], reduction="none")
            np.testing.assert_allclose(float(losses.mean()), float(out.loss), rtol=1e-5, atol=1e-6)
            rows.append(losses.numpy())
    return np.stack(rows)


@pytest.mark.parametrize("family", ABLATED)
def test_ablation_shared_prefix_equals_naive_and_the_models_own_forward(models, refs, sized_manifest, family):
    adapter = load_adapter(str(models[family])).adapter
    model, processor = refs[family]
    seen = set()
    for image in (0, 1):  # different numbers of image tokens for LLaVA-OneVision and SmolVLM
        planned, inputs = pairs_of(adapter, sized_manifest, [SHORT, EMPTY], image=image)
        for plan, pair in zip(planned, inputs):
            n = pair.n_image
            seen.add(n)
            truncate = [(k, n) for k in range(n + 1)]
            masks = [(i, i + 1) for i in range(0, n, 3)] + [(0, n // 2), (n // 3, n), (n - 1, n)]
            for style, settings in (("remove", truncate), ("remove", masks), ("block", masks)):
                shared = _run(shared_prefix_losses, adapter, pair, settings, style, batch_size=8)
                naive = _run(naive_losses, adapter, pair, settings, style, batch_size=8)
                assert shared.shape == (len(settings), plan.n_caption)
                np.testing.assert_allclose(shared, naive, **LOSS_TOL)
                assert np.ptp(shared.mean(1)) > 1e-3  # the settings really change the loss
            reference = own_losses(family, model, processor, plan, *zip(*truncate))
            np.testing.assert_allclose(
                _run(shared_prefix_losses, adapter, pair, truncate, "remove"), reference, **LOSS_TOL
            )
            if family == "gemma3":  # the window binds: ablated inputs are longer than Gemma's sliding window
                assert pair.n_tokens > model.config.text_config.sliding_window
    assert (len(seen) == 2) == (family in VARIABLE)


def test_mllama_ablation_is_refused_with_the_reason(models, sized_manifest, tmp_path):
    adapter = load_adapter(str(models["mllama"])).adapter
    with pytest.raises(ModelError, match="cross-attention"):
        pairs_of(adapter, sized_manifest, [SHORT])
    config = AblateConfig(
        model=str(models["mllama"]), data=str(sized_manifest), out=str(tmp_path / "a.zarr"), progress=False
    )
    with pytest.raises(ModelError, match="does not apply to Mllama"):
        ablate(config)


@pytest.mark.parametrize("family", FAMILIES)
def test_ablation_run_and_the_report_cover_everything(stores, models, sized_manifest, family, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(stores[family, 4], path)
    titles = ["Logit lens", "Inter-modal cosine", "Norm-based attention"]
    if family in ABLATED:
        prompts = tmp_path / "prompts.json"
        prompts.write_text(json.dumps({"short": "Describe.", "question": "What is depicted in the image?"}))
        options = dict(model=str(models[family]), data=str(sized_manifest), limit=2, prompts_file=str(prompts))
        assert ablate(AblateConfig(out=str(path), progress=False, **options)).written == 4
        naive = tmp_path / "naive.zarr"
        ablate(AblateConfig(out=str(naive), method="naive", progress=False, **options))
        ds = xr.open_zarr(path, group="ablation").load()
        n_image = ds["n_image_tokens"].values  # (sample, prompt)
        for s in range(2):
            np.testing.assert_allclose(ds["loss"].sel(k=int(n_image[s, 0]))[s], ds["full_loss"][s], **LOSS_TOL)
        np.testing.assert_allclose(ds["loss"], xr.open_zarr(naive, group="ablation")["loss"], **LOSS_TOL)
        titles.append("Image-token ablations")
    page = write_report([open_store(str(path))], tmp_path / "report").read_text()
    for title in titles:
        assert title in page
    top = pd.read_csv(tmp_path / "report" / "norm_attention" / "top_image_tokens.csv")
    assert len(top) and ((top["row"] >= 0) == (family == "gemma3")).all()
    means = norm_attention(open_store(str(path)))
    assert np.isnan(means["image_share"].sel(layer=2)).all() == (
        family == "mllama"
    )  # Mllama's layer 2 is cross-attention
