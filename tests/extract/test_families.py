"""Families with a variable number of image tokens, end to end: LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Idefics3.

Tiny random-init checkpoints (`vislens.toys.families`) saved with ``save_pretrained`` and
loaded back through `load_adapter`; images of four sizes give different numbers of image tokens,
also within one batch. Every number is checked against the model's own forward, loaded directly
with transformers (Qwen's processor without its video processor, which needs torchvision).
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
from tests.analyze.test_norm_attention import brute_force as norm_attention_brute_force
from tests.helpers import (
    assert_instruction_roles,
    assert_lens_top1_equals_lm_head,
    extract_stores,
    hidden_of,
    image_of,
    lm_outputs,
    run_reference,
)
from vislens.ablate import AblateConfig, ablate, naive_losses, shared_prefix_losses
from vislens.analyze import cosine_per_sample
from vislens.analyze.norm_attention import norm_attention_per_sample
from vislens.analyze.report import write_report
from vislens.errors import ModelError
from vislens.extract import ExtractConfig, extract
from vislens.extract.adapters import adapter_class, load_adapter
from vislens.extract.adapters.qwen2_vl import image_text_processor
from vislens.extract.prompts import Prompt
from vislens.store import DONE, IMAGE, PADDING, TEXT, open_store
from vislens.toys.families import FAMILIES, build_toy_family
from vislens.toys.shapes import make_shapes

SIZES = [(64, 64), (96, 48), (40, 80), (48, 64)]  # (width, height)
FP16 = dict(rtol=2e-3, atol=2e-3)
EMPTY = Prompt("empty", "empty", "")
QWEN = ("qwen2_vl", "qwen2_5_vl")
ADAPTERS = {"llava_next": "LlavaNextAdapter", "qwen2_vl": "Qwen2VLAdapter", "qwen2_5_vl": "Qwen2VLAdapter"}
ADAPTERS["idefics3"] = "Idefics3Adapter"


@pytest.fixture(scope="module")
def sized_manifest(tmp_path_factory):
    """Four shapes-world images resized to `SIZES`: different numbers of image tokens per image."""
    manifest = make_shapes(tmp_path_factory.mktemp("sized"), n=len(SIZES), start=5)
    for line, size in zip(manifest.read_text().splitlines(), SIZES):
        path = manifest.parent / json.loads(line)["image"]
        Image.open(path).convert("RGB").resize(size).save(path)
    return manifest


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One tiny checkpoint per family."""
    root = tmp_path_factory.mktemp("families")
    return {family: build_toy_family(family, root / family, seed=i) for i, family in enumerate(FAMILIES)}


def _reference(family, path):
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager").eval()
    processor = (image_text_processor() if family in QWEN else AutoProcessor).from_pretrained(path)
    return model, processor


@pytest.fixture(scope="module")
def refs(models):
    """(model, processor) per family, loaded directly with transformers."""
    return {family: _reference(family, path) for family, path in models.items()}


@pytest.fixture(scope="module")
def stores(models, sized_manifest, tmp_path_factory):
    """Per (family, batch size): 4 images x (normal, noisy, empty); batch 4 (two images of different
    sizes in each batch) also captures text-query attention."""
    root = tmp_path_factory.mktemp("family-stores")
    return extract_stores(models, sized_manifest, root, ((1, "none"), (4, "text")), 3 * len(SIZES))


@pytest.fixture(scope="module")
def own(stores, refs, sized_manifest):
    """Per family and stored sample: (inputs, hidden (layer, token, hidden) float32) of the model's own unbatched forward."""
    records = [json.loads(line) for line in sized_manifest.read_text().splitlines()]
    out = {}
    for family in FAMILIES:
        acts = open_store(stores[family, 4])["activations"].to_dataset()
        model, processor = refs[family]
        out[family] = []
        for s in range(acts.sizes["sample"]):
            image = str(sized_manifest.parent / records[int(acts.image_index[s])]["image"])
            inputs, outputs = run_reference(model, processor, image, str(acts.prompt_text[s].values))
            out[family].append((inputs, hidden_of(outputs)))
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch_size", [1, 4])
def test_hidden_states_and_image_positions_equal_the_models_own(stores, refs, own, family, batch_size):
    tree = open_store(stores[family, batch_size])
    acts = tree["activations"].to_dataset().load()
    model, _ = refs[family]
    assert tree.attrs["model"]["family"] == adapter_class(model.config.model_type).family
    assert acts.sizes["layer"] == model.config.text_config.num_hidden_layers + 1
    counts = []
    for s, (inputs, ref) in enumerate(own[family]):
        n = ref.shape[1]
        assert int(acts.n_tokens[s]) == n
        np.testing.assert_allclose(acts.hidden[s, :, :n].values.astype(np.float32), ref, **FP16)
        np.testing.assert_array_equal(acts.token_id[s, :n].values, inputs["input_ids"][0].numpy())
        image = image_of(model, inputs)  # the processor's placeholders
        np.testing.assert_array_equal(acts.modality[s, :n].values, np.where(image, IMAGE, TEXT))
        assert (acts.modality[s, n:].values == PADDING).all() and (acts.token_id[s, n:].values == -1).all()
        counts.append(int(image.sum()))
        if family in QWEN:
            t, h, w = inputs["image_grid_thw"][0].tolist()
            np.testing.assert_array_equal(acts.image_grid[s].values, [h // 2, w // 2])
            assert (h // 2) * (w // 2) == image.sum()
        else:
            np.testing.assert_array_equal(acts.image_grid[s].values, [0, 0])
    assert len(set(counts[:4])) > 1  # the first batch of 4 mixes image-token counts
    assert acts.sizes["token"] == max(int(v) for v in acts.n_tokens)
    assert (acts.done.values == DONE).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_counts_and_special_tokens(models, family):
    loaded = load_adapter(str(models[family]))
    adapter = loaded.adapter
    assert type(adapter).__name__ == ADAPTERS[family] and not adapter.fixed_image_tokens
    text = adapter.format_prompt("Describe the image.")
    counts = {adapter.count_tokens(text, size)[1] for size in SIZES}
    assert len(counts) > 1 and max(counts) <= 40
    # the study's LLaVA-style prompts keep their own template and still get one image
    templated = adapter.format_prompt("USER: <image>\nWhat is it? ASSISTANT:")
    assert templated.startswith("USER: ") and adapter.count_tokens(templated, SIZES[0])[1] in counts
    assert adapter.count_tokens(adapter.format_prompt(""), SIZES[0])[1] in counts
    texts, special = adapter.vocabulary()
    assert special[adapter.image_token_id] and len(texts) == adapter.unembedding.shape[0]
    if family == "idefics3":
        assert special[adapter.tokenizer.convert_tokens_to_ids("<row_1_col_1>")]


BREAK = {  # a processor whose placeholder count disagrees with the model's image features
    "llava_next": lambda p: setattr(p, "patch_size", 4),
    "qwen2_vl": lambda p: setattr(p.image_processor, "merge_size", 1),
    "qwen2_5_vl": lambda p: setattr(p.image_processor, "merge_size", 1),
    "idefics3": lambda p: setattr(p, "image_seq_len", 5),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_wrong_placeholder_count_is_an_error(models, sized_manifest, family, tmp_path):
    loaded = load_adapter(str(models[family]))
    BREAK[family](loaded.adapter.processor)
    out = str(tmp_path / "s.zarr")
    config = ExtractConfig(model=str(models[family]), data=str(sized_manifest), out=out, progress=False)
    with pytest.raises(ModelError, match=r"image placeholders \[\d+\] do not match the image features"):
        extract(config, loaded=loaded)  # caught on the first sample, before the store is created
    assert not (tmp_path / "s.zarr").exists()
    with pytest.raises(ModelError, match="image placeholders but .* image features"):
        pairs_of(loaded.adapter, sized_manifest, [SHORT])


@pytest.mark.parametrize("family", FAMILIES)
def test_logit_lens_top1_equals_the_models_own_lm_head(stores, refs, own, family):
    assert_lens_top1_equals_lm_head(open_store(stores[family, 4]), refs[family][0], own[family])


@pytest.mark.parametrize("family", FAMILIES)
def test_cosine_equals_brute_force(stores, refs, own, family):
    tree = open_store(stores[family, 4])
    ours = cosine_per_sample(tree, text_tokens="all").compute()
    acts = tree["activations"].to_dataset()
    for s, (inputs, hidden) in enumerate(own[family]):
        assert_instruction_roles(acts, s, refs[family][1].tokenizer)
        image = image_of(refs[family][0], inputs)
        for layer, h in enumerate(hidden):
            expected = [
                cosine_brute_force(h[image], h[~image]),
                cosine_brute_force(h[image], h[image], True),
                cosine_brute_force(h[~image], h[~image], True),
            ]
            got = [float(ours[name][s, layer]) for name in ("inter_modal", "intra_image", "intra_text")]
            np.testing.assert_allclose(got, expected, atol=2e-3, err_msg=f"sample {s} layer {layer}")


@pytest.mark.parametrize("family", FAMILIES)
def test_norm_attention_equals_brute_force(stores, refs, own, family):
    per = norm_attention_per_sample(open_store(stores[family, 4])).compute()
    model = refs[family][0]
    for s in (0, 1, 2, 4, 8):  # normal, noisy and empty prompts of images of different sizes
        inputs = own[family][s][0]
        na = norm_attention_brute_force(model, inputs)  # (layer, query, key)
        n = na.shape[1]
        np.testing.assert_allclose(per["last_query"][s, :, :n].values, na[:, n - 1, :], rtol=5e-3, atol=1e-5)
        image = image_of(model, inputs)
        text_q = np.flatnonzero(~image)
        shares = na[:, text_q][:, :, image].sum(-1) / na[:, text_q].sum(-1)
        np.testing.assert_allclose(per["image_share"][s].values, shares.mean(-1), rtol=5e-3)
        after = np.isin(text_q, text_q[text_q > np.argmax(image)])
        np.testing.assert_allclose(per["image_share_after_image"][s].values, shares[:, after].mean(-1), rtol=5e-3)


def qwen_positions(rope: torch.Tensor, image_pos: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """The documented rule, written plainly: kept image tokens keep their 3-D positions; the text
    after the image continues from 1 + the largest position of a kept token before it."""
    last = int(image_pos[-1])
    kept_before = [j for j in range(last + 1) if not removed[j]]
    top = max((int(rope[:, j].max()) for j in kept_before), default=-1)
    out = rope.clone()
    out[:, last + 1 :] -= int(rope[0, last + 1]) - (top + 1)
    return out


def own_losses(family, model, processor, plan, starts, stops) -> np.ndarray:
    """(setting, caption_token) cross-entropies of the model's own forward on each truly ablated input
    (``remove`` style): the removed span left out of its own input embeddings, each mean checked
    against the model's own ``labels`` loss."""
    image = Image.open(plan.record.image).convert("RGB")
    full = processor(images=[image], text=[plan.text], return_tensors="pt")
    n_context = processor(images=[image], text=[plan.context], return_tensors="pt")["input_ids"].shape[1]
    ids = full["input_ids"][0]
    image_pos = torch.nonzero(ids == model.config.image_token_id).flatten()
    rows = []
    with torch.no_grad():
        embeds = lm_outputs(model(**full, output_hidden_states=True)).hidden_states[0][0]
        if family in QWEN:
            keys = ("input_ids", "mm_token_type_ids", "image_grid_thw", "attention_mask")
            rope = model.model.get_rope_index(**{k: full[k] for k in keys})[0][:, 0]
        for s, e in zip(starts, stops):
            removed = torch.zeros(len(ids), dtype=torch.bool)
            if e > s:
                removed[int(image_pos[s]) : int(image_pos[e - 1]) + 1] = True
            labels = ids.clone()
            labels[:n_context] = -100
            extra = {}
            if family in QWEN:
                extra["position_ids"] = qwen_positions(rope, image_pos, removed)[:, ~removed][:, None]
            out = model(inputs_embeds=embeds[~removed][None], labels=labels[~removed][None], **extra)
            before = torch.arange(n_context, len(ids)) - 1 - int(removed.sum())
            losses = torch.nn.functional.cross_entropy(out.logits[0, before].float(), ids[n_context:], reduction="none")
            np.testing.assert_allclose(float(losses.mean()), float(out.loss), rtol=1e-5, atol=1e-6)
            rows.append(losses.numpy())
    return np.stack(rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_ablation_shared_prefix_equals_naive_and_the_models_own_forward(models, refs, sized_manifest, family):
    adapter = load_adapter(str(models[family])).adapter
    model, processor = refs[family]
    seen = set()
    for image in (0, 1):  # different numbers of image tokens
        planned, inputs = pairs_of(adapter, sized_manifest, [SHORT, EMPTY], image=image)
        for plan, pair in zip(planned, inputs):
            n = pair.n_image
            seen.add(n)
            assert (pair.image_pos[-1] + 1 - pair.image_start > n) == (family == "idefics3")  # tile markers inside
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
    assert len(seen) == 2


@pytest.mark.parametrize("family", QWEN)
def test_qwen_truncation_to_whole_rows_is_get_rope_index_of_those_rows(models, refs, sized_manifest, family):
    """Truncating to the first r rows of the image-token grid gives every token the positions that
    the model's own `get_rope_index` gives an input whose image has r rows."""
    adapter = load_adapter(str(models[family])).adapter
    model = refs[family][0]
    _, [pair] = pairs_of(adapter, sized_manifest, [SHORT], image=1)
    rows, cols = 2, 5  # 96x48 pixels: 10 image tokens in a 2 x 5 grid
    assert pair.n_image == rows * cols
    ids = torch.as_tensor(pair.token_ids)
    for r in range(1, rows + 1):
        keep = np.ones(pair.n_tokens, dtype=bool)
        keep[pair.image_pos[r * cols :]] = False
        kept_ids = ids[keep][None]
        types = (kept_ids == model.config.image_token_id).int()
        grid = torch.tensor([[1, 2 * r, 2 * cols]])
        expected = model.model.get_rope_index(input_ids=kept_ids, mm_token_type_ids=types, image_grid_thw=grid)[0]
        first, end = pair.removed_span(np.array([r * cols]), np.array([rows * cols]))
        removed = torch.zeros(1, pair.n_tokens, dtype=torch.bool)
        removed[0, int(first[0]) : int(end[0])] = True
        image = torch.zeros(pair.n_tokens, dtype=torch.bool)
        image[pair.image_pos] = True
        ours = adapter.ablated_positions(pair.rope, image, removed, True)[0][:, keep]
        torch.testing.assert_close(ours, expected[:, 0])


@pytest.mark.parametrize("family", FAMILIES)
def test_ablation_run_pads_each_images_settings_and_the_report_covers_everything(
    stores, models, sized_manifest, family, tmp_path
):
    path = tmp_path / "s.zarr"
    shutil.copytree(stores[family, 4], path)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"short": "Describe.", "question": "What is depicted in the image?"}))
    options = dict(model=str(models[family]), data=str(sized_manifest), limit=3, prompts_file=str(prompts))
    assert ablate(AblateConfig(out=str(path), progress=False, **options)).written == 6
    naive = tmp_path / "naive.zarr"
    ablate(AblateConfig(out=str(naive), method="naive", progress=False, **options))
    ds = xr.open_zarr(path, group="ablation").load()
    n_image = ds["n_image_tokens"].values  # (sample, prompt)
    assert (n_image == n_image[:, :1]).all() and len(set(n_image[:, 0])) > 1
    assert int(ds.attrs["n_image_tokens"]) == n_image.max()
    np.testing.assert_array_equal(ds["k"], np.arange(1, n_image.max() + 1))
    fits = ds["k"].values[None, None, :] <= n_image[..., None]
    assert np.isfinite(ds["loss"].values[fits]).all() and np.isnan(ds["loss"].values[~fits]).all()
    assert np.isnan(ds["token_loss"].values[~fits]).all()
    for s in range(3):
        np.testing.assert_allclose(ds["loss"].sel(k=int(n_image[s, 0]))[s], ds["full_loss"][s], **LOSS_TOL)
        np.testing.assert_array_equal(
            (ds["modality"].values[s] == IMAGE).sum(-1), n_image[s]
        )  # the store's modality marks exactly the image tokens
    np.testing.assert_allclose(ds["loss"], xr.open_zarr(naive, group="ablation")["loss"], **LOSS_TOL)

    index = write_report([open_store(str(path))], tmp_path / "report")
    page = index.read_text()
    for title in ("Logit lens", "Inter-modal cosine", "Norm-based attention", "Image-token ablations"):
        assert title in page
    folder = tmp_path / "report"
    assert (folder / "ablation" / "ablation_truncation.png").exists()
    top = pd.read_csv(folder / "norm_attention" / "top_image_tokens.csv")
    assert len(top)
    gridded = family in QWEN  # Qwen's image tokens form a rows x cols grid; the others have none
    assert ((top["row"] >= 0) == gridded).all()
    assert bool(list((folder / "norm_attention").glob("grid_*.png"))) == gridded
