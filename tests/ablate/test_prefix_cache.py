"""The prefix cache of an ablation run is reused only for prompts whose prefix is truly the same.

`vislens.ablate.run` runs one image prefix per image and reuses it for every prompt that shares
it. For LLaVA the prefix (template text and image features) is the same under every prompt. For
InstructBLIP the image features depend on the prompt (the Q-Former reads it) while the image
placeholder ids do not, so a cache keyed by token ids alone would give every prompt the image
features of the first. The shared-prefix run must equal the naive one (a full forward per setting)
for every prompt, to float32 rounding.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from vislens.ablate import AblateConfig, ablate
from vislens.toys.instructblip import build_toy_instructblip

EXACT = dict(rtol=2e-6, atol=2e-6)  # shared and naive agree to ~5e-7; prompt-dependent features move ~1e-4


@pytest.fixture(scope="module")
def instructblip(tmp_path_factory):
    return build_toy_instructblip(tmp_path_factory.mktemp("instructblip") / "model")


@pytest.mark.parametrize("family", ["llava", "instructblip"])
def test_shared_prefix_run_equals_the_naive_run_for_every_prompt(family, toy_models, instructblip, manifest, tmp_path):
    model = instructblip if family == "instructblip" else toy_models["gqa"]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"short": "Describe.", "long": "What is depicted in this picture, in a few words?"}))
    options = dict(model=str(model), data=str(manifest), limit=2, ks=(1, 4, 8), prompts_file=str(prompts))
    groups = {}
    for method in ("shared", "naive"):
        out = tmp_path / f"{method}.zarr"
        assert ablate(AblateConfig(out=str(out), method=method, progress=False, **options)).written == 4
        groups[method] = xr.open_zarr(out, group="ablation").load()
    for name in ("loss", "token_loss", "full_loss", "full_token_loss"):
        np.testing.assert_allclose(groups["shared"][name], groups["naive"][name], **EXACT, err_msg=name)
