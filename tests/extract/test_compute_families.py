"""--compute on every family's toy: the statistics computed during extraction equal the analyses
of the hidden states and attention stored by the same run (issue 17, "same numbers either way")."""

from __future__ import annotations

import numpy as np
import pytest

from vislens.analyze.cosine import cosine_per_sample
from vislens.analyze.logit_lens import cached_topk
from vislens.analyze.norm_attention import norm_attention_per_sample
from vislens.extract import ExtractConfig, extract
from vislens.store import open_store
from vislens.toys import ToyInstructBlipSpec, build_toy_instructblip
from vislens.toys.families import FAMILIES, build_toy_family
from vislens.toys.more_families import FAMILIES as MORE_FAMILIES
from vislens.toys.shapes import make_shapes

FP16 = dict(rtol=0, atol=2e-3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("compute-families"), n=2, start=11)


def _model(family: str, root):
    if family == "instructblip":
        return build_toy_instructblip(root / family, ToyInstructBlipSpec(layers=2, seed=3))
    return build_toy_family(family, root / family, layers=2, seed=3)


@pytest.mark.parametrize("family", ["instructblip", *FAMILIES, *MORE_FAMILIES])
def test_statistics_during_extraction_equal_the_analyses(family, data, tmp_path):
    model = _model(family, tmp_path)
    out = tmp_path / "s.zarr"
    extract(
        ExtractConfig(
            model=str(model),
            data=str(data),
            out=str(out),
            prompts=("normal", "noisy", "empty"),
            batch_size=3,
            progress=False,
            compute=("cosine", "norm-attention", "lens"),
            lens_topk=2,
        )
    )
    tree = open_store(str(out))
    for text_tokens in ("instruction", "all", "template"):
        a = cosine_per_sample(tree, text_tokens=text_tokens, source="results").compute()
        b = cosine_per_sample(tree, text_tokens=text_tokens, source="hidden").compute()
        for name in ("inter_modal", "intra_image", "intra_text"):
            np.testing.assert_allclose(a[name].values, b[name].values, **FP16, err_msg=f"{text_tokens} {name}")
    a = norm_attention_per_sample(tree, source="results").compute()
    b = norm_attention_per_sample(tree, source="attention").compute()
    for name in ("image_share", "image_share_after_image", "last_query"):
        np.testing.assert_allclose(a[name].values, b[name].values, rtol=1e-4, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(cached_topk(tree, 2).values, cached_topk(tree, 2, cache=False).values)
