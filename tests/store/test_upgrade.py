"""Version 1 stores (a small one is checked in) are read in the version 2 layout, unchanged on disk.

``tests/fixtures/store-v1`` was written by vislens at format version 1 (commit f47bb30): a tiny
random-init LLaVA (2 decoder layers, width 64), 2 synthetic images x (normal, empty) prompts,
attention of the last token.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vislens.analyze import cosine, logit_lens, norm_attention
from vislens.analyze.cosine import cosine_per_sample
from vislens.errors import StoreFormatError
from vislens.store import open_store, read_layer
from vislens.store.inspect import info, verify

FIXTURE = Path(__file__).parents[1] / "fixtures" / "store-v1"


@pytest.fixture
def v1(tmp_path) -> Path:
    target = tmp_path / "v1.zarr"
    shutil.copytree(FIXTURE, target)
    return target


def _files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_v1_reads_in_the_v2_layout(v1):
    before = _files(v1)
    tree = open_store(str(v1))
    assert tree.attrs["vislens_format_version"] == 1 and tree.attrs["vislens_read_as_version"] == 2
    acts = tree["activations"].to_dataset()
    assert "hidden" in acts.data_vars and acts["hidden"].dims == ("sample", "layer", "token", "d_model")
    assert tree["lens"]["unembedding"].dims == ("vocab", "d_model")
    assert "token_role" not in acts
    np.testing.assert_array_equal(tree["attention"]["layer"].values, [1, 2])  # stored as 0, 1
    assert _files(v1) == before  # nothing on disk changed
    assert info(str(v1))["format_version"] == 1
    assert verify(str(v1)) == []
    np.testing.assert_array_equal(
        read_layer(str(v1), 2, array="attention/attn"), tree["attention"]["attn"].values[:, 1]
    )


def test_analyses_on_a_v1_store(v1):
    tree = open_store(str(v1))
    with pytest.raises(StoreFormatError, match="--text-tokens all"):
        cosine(tree)
    per = cosine_per_sample(tree, text_tokens="all").compute()
    acts = tree["activations"].to_dataset()
    s, layer = 0, 1
    n = int(acts.n_tokens[s])
    h = torch.from_numpy(acts.hidden[s, layer, :n].values.astype(np.float64))
    image = acts.modality[s, :n].values == 1
    unit = torch.nn.functional.normalize(h, dim=-1)
    expected = float((unit[image] @ unit[~image].T).mean())
    assert abs(float(per["inter_modal"][s, layer]) - expected) < 2e-3
    lens = logit_lens(tree, cache=False)
    assert set(lens.data_vars) >= {"precision", "token_precision", "recall"}
    shares = norm_attention(tree)
    np.testing.assert_array_equal(shares["layer"].values, [1, 2])
