"""Statistics computed during extraction (--compute) equal the analyses of a full store of the same
run; --keep none stores no hidden states or attention; --layers keeps some layers (issue 17)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vislens.analyze import cosine, logit_lens, norm_attention
from vislens.analyze.cosine import cosine_per_sample
from vislens.analyze.logit_lens import cached_topk
from vislens.analyze.norm_attention import norm_attention_per_sample
from vislens.errors import ConfigError, StoreFormatError
from vislens.extract import ExtractConfig, extract
from vislens.store import open_store

FP16 = dict(rtol=0, atol=2e-3)
"""Statistics on the model's device from fp16 states vs the same from the stored fp16 states:
the same inputs, summed in another order."""
STATS = "cosine", "norm-attention", "lens"


def _extract(model, manifest, out, **kwargs):
    options = dict(prompts=("normal", "noisy", "empty"), limit=3, batch_size=2, progress=False, attention="text")
    options.update(kwargs)
    extract(ExtractConfig(model=str(model), data=str(manifest), out=str(out), **options))
    return open_store(str(out))


@pytest.fixture(scope="module")
def stores(toy_models, manifest, tmp_path_factory):
    """One run three ways: everything kept and computed, statistics only, and every other layer."""
    root = tmp_path_factory.mktemp("compute")
    model = toy_models["gqa"]
    return {
        "full": _extract(model, manifest, root / "full.zarr", compute=STATS),
        "none": _extract(model, manifest, root / "none.zarr", compute=STATS, keep=()),
        "layers": _extract(model, manifest, root / "layers.zarr", layers="0:4:2"),
    }


def test_cosine_computed_during_extraction_equals_the_analysis(stores):
    tree = stores["full"]
    for text_tokens in ("instruction", "all", "template"):
        stored = cosine_per_sample(tree, text_tokens=text_tokens, source="results").compute()
        offline = cosine_per_sample(tree, text_tokens=text_tokens, source="hidden").compute()
        for name in ("inter_modal", "intra_image", "intra_text"):
            np.testing.assert_allclose(
                stored[name].values, offline[name].values, **FP16, err_msg=f"{text_tokens} {name}"
            )
    instruction = cosine_per_sample(tree, source="results").compute()
    empty = np.array([str(k) == "empty" for k in instruction["prompt_kind"].values])
    assert np.isnan(instruction["inter_modal"].values[empty]).all()  # no instruction: NaN, as offline
    assert np.isfinite(instruction["inter_modal"].values[~empty]).all()


def test_norm_attention_computed_during_extraction_equals_the_analysis(stores):
    tree = stores["full"]
    stored = norm_attention_per_sample(tree, source="results").compute()
    offline = norm_attention_per_sample(tree, source="attention").compute()
    np.testing.assert_array_equal(stored["layer"].values, offline["layer"].values)
    for name in ("image_share", "image_share_after_image", "last_query"):
        np.testing.assert_allclose(stored[name].values, offline[name].values, rtol=1e-4, atol=1e-6, err_msg=name)


def test_lens_computed_during_extraction_equals_the_analysis(stores):
    tree = stores["full"]
    stored = cached_topk(tree, 3)  # from results/logit_lens_topk, written during extraction
    offline = cached_topk(tree, 3, cache=False)  # recomputed from the stored hidden states
    np.testing.assert_array_equal(stored.values, offline.values)
    values = tree["results"]["logit_lens_topk"]["logit_lens_topk_values"].values  # (sample, layer, token, rank)
    image = tree["activations"]["modality"].values == 1  # (sample, token)
    assert np.isfinite(values.transpose(0, 2, 1, 3)[image]).all()
    assert np.isnan(values.transpose(0, 2, 1, 3)[~image]).all()
    assert (np.diff(values.transpose(0, 2, 1, 3)[image], axis=-1) <= 0).all()  # largest first


def test_statistics_only_store_gives_the_same_tables(stores):
    full, none = stores["full"], stores["none"]
    assert "hidden" not in none["activations"].data_vars and "attention" not in none.children
    assert none.attrs["keep"] == ["none"] and set(none.attrs["computed"]) == set(STATS)
    for text_tokens in ("instruction", "all"):
        a = cosine(full, text_tokens=text_tokens)
        b = cosine(none, text_tokens=text_tokens)
        np.testing.assert_allclose(a["inter_modal"].values, b["inter_modal"].values, rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        norm_attention(full)["image_share"].values, norm_attention(none)["image_share"].values, rtol=0, atol=1e-6
    )
    lens_full, lens_none = logit_lens(full, top_k=3), logit_lens(none, top_k=3)
    for name in ("precision", "token_precision", "recall"):
        np.testing.assert_allclose(lens_full[name].values, lens_none[name].values, rtol=0, atol=1e-12)
    with pytest.raises(StoreFormatError, match="holds no hidden states.*--keep none.*needs them"):
        logit_lens(none, top_k=10)  # more than the top-5 computed during extraction
    folder = Path(none.attrs["vislens_url"])
    assert not (folder / "activations" / "hidden").exists() and not (folder / "attention").exists()


def test_some_layers_kept(stores):
    full_hidden = stores["full"]["activations"]["hidden"]
    tree = stores["layers"]
    acts = tree["activations"]
    np.testing.assert_array_equal(acts["layer"].values, [0, 2])
    np.testing.assert_array_equal(tree["attention"]["layer"].values, [2])
    np.testing.assert_array_equal(acts["hidden"].values, full_hidden.sel(layer=[0, 2]).values)
    lens = logit_lens(tree, cache=False)
    np.testing.assert_array_equal(lens["layer"].values, [0, 2])
    np.testing.assert_array_equal(norm_attention(tree)["layer"].values, [2])


def test_bad_options_are_refused(toy_models, manifest, tmp_path):
    with pytest.raises(ConfigError, match="--compute takes"):
        ExtractConfig(model="m", data="d", out="o", compute=("cosines",))
    with pytest.raises(ConfigError, match="needs attention query rows"):
        ExtractConfig(model="m", data="d", out="o", compute=("norm-attention",), attention="none")
    with pytest.raises(ConfigError, match="--layers takes"):
        ExtractConfig(model="m", data="d", out="o", layers="0:x")
    with pytest.raises(ConfigError, match="hidden states 0 .. 3"):
        _extract(toy_models["gqa"], manifest, tmp_path / "s.zarr", layers="0,9")


def test_lens_topk_at_extraction_gives_the_same_table_through_the_cli(toy_models, manifest, tmp_path):
    """`vislens extract --lens-topk K` then `vislens analyze logit-lens` equals extracting without it
    and running the CPU lens (issue 14's done-when), through the real command line."""
    import pandas as pd

    from vislens.cli import main

    common = ["--model", str(toy_models["mha"]), "--data", str(manifest), "--limit", "3", "--no-progress"]
    common += ["--prompts", "normal,noisy", "--attention", "none"]
    assert main(["extract", *common, "--out", str(tmp_path / "a.zarr"), "--lens-topk", "3"]) == 0
    assert main(["extract", *common, "--out", str(tmp_path / "b.zarr")]) == 0
    assert "lens" in open_store(str(tmp_path / "a.zarr")).attrs["computed"]
    tables = []
    for name in ("a", "b"):
        assert (
            main(
                ["analyze", "logit-lens", str(tmp_path / f"{name}.zarr"), "--top-k", "3", "--out", str(tmp_path / name)]
            )
            == 0
        )
        tables.append(pd.read_csv(tmp_path / name / "logit_lens.csv").drop(columns=["store", "series"]))
    pd.testing.assert_frame_equal(tables[0], tables[1])
