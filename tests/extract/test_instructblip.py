"""InstructBLIP end to end: query tokens before BOS, Q-Former inputs, nested language-model outputs.

Every number vislens stores or computes is checked against the model's own forward (loaded
directly with transformers) on tiny random-init checkpoints saved with ``save_pretrained``.
"""

from __future__ import annotations

import json
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from tests.ablate.conftest import LOSS_TOL, SHORT, hf_token_losses, pairs_of
from tests.ablate.test_engine import _run
from tests.analyze.test_cosine import brute_force as cosine_brute_force
from tests.analyze.test_norm_attention import brute_force as norm_attention_brute_force
from tests.helpers import (
    assert_instruction_roles,
    assert_top1_matches,
    decoder_of,
    extract_stores,
    hidden_of,
    load_reference,
    run_reference,
)
from vislens.ablate import AblateConfig, ablate, naive_losses, shared_prefix_losses
from vislens.analyze import cosine_per_sample
from vislens.analyze.logit_lens import logit_lens_topk
from vislens.analyze.norm_attention import norm_attention_per_sample
from vislens.analyze.report import write_report
from vislens.errors import ModelError
from vislens.extract import ExtractConfig, extract
from vislens.extract.adapters import load_adapter
from vislens.extract.adapters.instructblip import InstructBlipAdapter
from vislens.extract.prompts import Prompt
from vislens.store import DONE, IMAGE, PADDING, TEXT, open_store
from vislens.toys import ToyInstructBlipSpec, build_toy_instructblip

ARCHS = ["mha", "gqa"]
SPECS = {"mha": ToyInstructBlipSpec(kv_heads=4, seed=1), "gqa": ToyInstructBlipSpec(kv_heads=2, seed=2)}
Q = ToyInstructBlipSpec().query_tokens
FP16 = dict(rtol=2e-3, atol=2e-3)
EMPTY = Prompt("empty", "empty", "")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny InstructBLIP checkpoints: multi-head and grouped-query decoders."""
    root = tmp_path_factory.mktemp("instructblip")
    return {arch: build_toy_instructblip(root / arch, spec) for arch, spec in SPECS.items()}


@pytest.fixture(scope="module")
def refs(models):
    """(model, processor) per architecture, loaded directly with transformers."""
    return {arch: load_reference(path) for arch, path in models.items()}


@pytest.fixture(scope="module")
def stores(models, manifest, tmp_path_factory):
    """Per (arch, batch size): 6 images x (normal, noisy, empty); batch 3 also captures text-query attention."""
    root = tmp_path_factory.mktemp("instructblip-stores")
    return extract_stores(models, manifest, root, ((1, "none"), (3, "text")), 18)


@pytest.fixture(scope="module")
def own(stores, refs, manifest):
    """Per arch and stored sample: (inputs, hidden (layer, token, hidden) float32) of the model's own unbatched forward.

    A prompt holding ``<image>`` (the study's LLaVA-templated ones) loses it and the whitespace
    around it: InstructBLIP's processor inserts the image tokens itself.
    """
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    out = {}
    for arch in ARCHS:
        acts = open_store(stores[arch, 3])["activations"].to_dataset()
        model, processor = refs[arch]
        out[arch] = []
        for s in range(acts.sizes["sample"]):
            image = str(manifest.parent / records[int(acts.image_index[s])]["image"])
            prompt = re.sub(r"\s*<image>\s*", " ", str(acts.prompt_text[s].values)).strip()
            inputs, outputs = run_reference(model, processor, image, prompt)
            out[arch].append((inputs, hidden_of(outputs)))
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_hidden_states_equal_the_language_models_own(stores, refs, own, arch, batch_size):
    tree = open_store(stores[arch, batch_size])
    acts = tree["activations"].to_dataset().load()
    model, processor = refs[arch]
    assert tree.attrs["model"]["family"] == "instructblip"
    assert acts.sizes["layer"] == model.config.text_config.num_hidden_layers + 1
    prompt_lengths = set()
    for s, (inputs, ref) in enumerate(own[arch]):
        n = ref.shape[1]
        prompt_lengths.add(n)
        assert int(acts.n_tokens[s]) == n
        np.testing.assert_allclose(acts.hidden[s, :, :n].values.astype(np.float32), ref, **FP16)
        ids = inputs["input_ids"][0].numpy()
        np.testing.assert_array_equal(acts.token_id[s, :n].values, ids)
        # the processor's placeholders: the first Q positions, then BOS
        np.testing.assert_array_equal(np.flatnonzero(ids == model.config.image_token_id), np.arange(Q))
        assert ids[Q] == processor.tokenizer.bos_token_id
        np.testing.assert_array_equal(acts.modality[s, :n].values, np.where(np.arange(n) < Q, IMAGE, TEXT))
        assert (acts.modality[s, n:].values == PADDING).all()
        np.testing.assert_array_equal(acts.image_grid[s].values, [0, 0])
    assert (acts.done.values == DONE).all()
    assert min(prompt_lengths) == Q + 1 and len(prompt_lengths) > 2  # empty prompts and padded batches


def test_prompts_are_not_templated_and_placeholders_not_doubled(models):
    adapter = load_adapter(str(models["gqa"])).adapter
    assert adapter.format_prompt("Describe the image.") == "Describe the image."
    assert adapter.format_prompt("<image>\nDescribe the image.") == "Describe the image."
    assert adapter.format_prompt("USER: <image>\nWhat is it? ASSISTANT:") == "USER: What is it? ASSISTANT:"
    for text in ("", "<image>", "Describe the image."):
        assert adapter.count_tokens(adapter.format_prompt(text), (64, 64))[1] == Q
    assert adapter.count_tokens("", (64, 64)) == (Q + 1, Q)
    _, special = adapter.vocabulary()
    assert special[adapter.image_token_id] and special[adapter.tokenizer.bos_token_id]


def test_a_wrong_placeholder_count_stops_extraction_and_ablation(models, manifest, tmp_path):
    loaded = load_adapter(str(models["gqa"]))
    loaded.adapter.processor.num_query_tokens = Q - 1  # the model's own forward would silently misalign
    config = ExtractConfig(
        model=str(models["gqa"]), data=str(manifest), out=str(tmp_path / "s.zarr"), prompts=("normal",), progress=False
    )
    with pytest.raises(ModelError, match=r"placeholders \[7\] do not match the image features \[8\]"):
        extract(config, loaded=loaded)  # caught on the first sample, before the store is created
    assert not (tmp_path / "s.zarr").exists()
    with pytest.raises(ModelError, match=r"placeholders per sample \[7\] but 8 query features"):
        pairs_of(loaded.adapter, manifest, [SHORT])


def test_unusable_checkpoints_are_refused_and_a_missing_image_token_index_is_filled(models, manifest, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(models["mha"], path)
    processor_config = json.loads((path / "processor_config.json").read_text())
    (path / "processor_config.json").write_text(json.dumps({**processor_config, "num_query_tokens": Q + 1}))
    with pytest.raises(ModelError, match="inserts 9 image placeholders per image but the model makes 8"):
        load_adapter(str(path))
    (path / "processor_config.json").write_text(json.dumps({**processor_config, "num_query_tokens": None}))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "image_token_index": None}))
    loaded = load_adapter(str(path))  # as older hub revisions: both counts taken from the checkpoint
    assert loaded.adapter.image_token_id == loaded.adapter.tokenizer.convert_tokens_to_ids("<image>")
    assert loaded.adapter.processor.num_query_tokens == Q
    out = str(tmp_path / "s.zarr")
    extract(ExtractConfig(model=str(path), data=str(manifest), out=out, limit=1, progress=False), loaded=loaded)
    assert (open_store(out)["activations"]["modality"].values[0, :Q] == IMAGE).all()

    model, processor = load_reference(path)
    model.config.image_token_index = 5
    with pytest.raises(ModelError, match="image_token_index is 5 but the processor's placeholder '<image>' is token 4"):
        InstructBlipAdapter(model, processor)
    t5 = SimpleNamespace(
        config=SimpleNamespace(use_decoder_only_language_model=False, text_config=SimpleNamespace(model_type="t5"))
    )
    with pytest.raises(ModelError, match="encoder-decoder language model"):
        InstructBlipAdapter(t5, processor)


@pytest.mark.parametrize("arch", ARCHS)
def test_logit_lens_top1_equals_the_models_own_lm_head(stores, refs, own, arch):
    tree = open_store(stores[arch, 3])
    top = logit_lens_topk(tree, k=1).compute()
    acts = tree["activations"].to_dataset()
    model = refs[arch][0]
    norm, head = decoder_of(model).norm, model.get_output_embeddings()
    compared = total = 0
    for s, (_, hidden) in enumerate(own[arch]):
        assert (top[s].values[:, Q:] == -1).all()  # text tokens are not decoded
        ours = torch.from_numpy(top[s].values[:, :Q, 0].astype(np.int64))
        stored = torch.from_numpy(acts.hidden[s].values[:, :Q].astype(np.float32))
        states = torch.from_numpy(hidden[:, :Q])
        done = assert_top1_matches(ours, stored, states, norm, head)
        compared, total = compared + done[0], total + done[1]
    assert compared / total > 0.5


@pytest.mark.parametrize("arch", ARCHS)
def test_cosine_equals_brute_force(stores, refs, own, arch):
    tree = open_store(stores[arch, 3])
    ours = cosine_per_sample(tree, text_tokens="all").compute()
    acts = tree["activations"].to_dataset()
    for s, (_, hidden) in enumerate(own[arch]):
        assert_instruction_roles(acts, s, refs[arch][1].tokenizer)
        image = np.arange(hidden.shape[1]) < Q
        for layer, h in enumerate(hidden):
            expected = [
                cosine_brute_force(h[image], h[~image]),
                cosine_brute_force(h[image], h[image], True),
                cosine_brute_force(h[~image], h[~image], True) if (~image).sum() > 1 else np.nan,
            ]
            got = [float(ours[name][s, layer]) for name in ("inter_modal", "intra_image", "intra_text")]
            np.testing.assert_allclose(got, expected, atol=2e-3, err_msg=f"sample {s} layer {layer}")


@pytest.mark.parametrize("arch", ARCHS)
def test_norm_attention_equals_brute_force(stores, refs, own, arch):
    per = norm_attention_per_sample(open_store(stores[arch, 3])).compute()
    model = refs[arch][0]
    for s in (0, 1, 2, 15, 16):  # normal, noisy, empty, a LLaVA-templated prompt, noisy
        inputs = own[arch][s][0]
        na = norm_attention_brute_force(model, inputs)  # (layer, query, key)
        n = na.shape[1]
        np.testing.assert_allclose(per["last_query"][s, :, :n].values, na[:, n - 1, :], rtol=5e-3, atol=1e-5)
        text_q = np.arange(Q, n)  # every text query follows the image
        shares = na[:, text_q, :Q].sum(-1) / na[:, text_q].sum(-1)
        np.testing.assert_allclose(per["image_share"][s].values, shares.mean(-1), rtol=5e-3)
        np.testing.assert_allclose(per["image_share_after_image"][s].values, shares.mean(-1), rtol=5e-3)


SINGLES = [(i, i + 1) for i in range(Q)]
INTERVALS = [(0, 3), (2, 6), (0, Q), (Q - 1, Q)]
CASES = {
    "truncate": ("remove", [(k, Q) for k in range(Q + 1)]),
    "mask-remove": ("remove", SINGLES + INTERVALS),
    "mask-block": ("block", SINGLES + INTERVALS),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", ARCHS)
def test_ablation_shared_prefix_equals_naive_and_the_models_own_forward(models, refs, manifest, arch, case):
    style, settings = CASES[case]
    adapter = load_adapter(str(models[arch])).adapter
    model, processor = refs[arch]
    planned, inputs = pairs_of(adapter, manifest, [SHORT, EMPTY])
    start, stop = zip(*settings)
    for plan, pair in zip(planned, inputs):
        assert (pair.image_start, pair.n_image) == (0, Q)  # query tokens first: no text before the image
        assert pair.token_ids[Q] == processor.tokenizer.bos_token_id
        shared = _run(shared_prefix_losses, adapter, pair, settings, style, batch_size=4)
        naive = _run(naive_losses, adapter, pair, settings, style, batch_size=4)
        reference = hf_token_losses(model, processor, plan.record.image, plan.context, plan.text, start, stop, style)
        assert shared.shape == (len(settings), plan.n_caption)
        np.testing.assert_allclose(shared, naive, **LOSS_TOL)
        np.testing.assert_allclose(shared, reference, **LOSS_TOL)
        assert np.ptp(reference.mean(1)) > 1e-3  # the settings really change the loss


def test_report_on_an_instructblip_store_with_an_ablation(stores, models, manifest, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(stores["gqa", 3], path)
    config = AblateConfig(
        model=str(models["gqa"]), data=str(manifest), out=str(path), limit=2, ks=(0, 2, Q), progress=False
    )
    assert ablate(config).written == 10
    ds = xr.open_zarr(path, group="ablation").load()
    assert int(ds.attrs["n_image_tokens"]) == Q
    np.testing.assert_allclose(ds["loss"].sel(k=Q), ds["full_loss"], **LOSS_TOL)
    index = write_report([open_store(str(path))], tmp_path / "report")
    page = index.read_text()
    for title in ("Logit lens", "Inter-modal cosine", "Norm-based attention", "Image-token ablations"):
        assert title in page
    folder = tmp_path / "report" / "norm_attention"
    top = pd.read_csv(folder / "top_image_tokens.csv")
    assert len(top) and top["image_token"].between(0, Q - 1).all()
    assert (top["row"] == -1).all() and (top["col"] == -1).all()  # query tokens have no patch grid
    assert not list(folder.glob("grid_*.png"))
