"""Every toy checkpoint has random, non-unit norm weights, so that a dropped or doubled norm shows."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForImageTextToText

from vislens.toys import ToyInstructBlipSpec, ToySpec, build_toy_family, build_toy_instructblip, build_toy_model
from vislens.toys.norms import is_norm, randomize_norms


def _build(kind: str, path, seed: int):
    if kind == "llava":
        return build_toy_model(path, ToySpec(layers=2, seed=seed))
    if kind == "instructblip":
        return build_toy_instructblip(path, ToyInstructBlipSpec(layers=2, seed=seed))
    return build_toy_family(kind, path, layers=2, seed=seed)


def _norms(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in model.named_modules() if is_norm(module)}


KINDS = ["llava", "instructblip", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3"]
KINDS += ["gemma3", "llava_onevision", "mllama", "smolvlm"]


@pytest.mark.parametrize("kind", KINDS)
def test_saved_checkpoints_have_non_unit_norms_everywhere(kind, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(_build(kind, tmp_path / "m", seed=3))
    norms = _norms(model)
    decoder_final = [n for n in norms if n.endswith("model.norm") or n.endswith("language_model.norm")]
    assert decoder_final, f"no final decoder norm among {sorted(norms)}"
    outside = [n for n in norms if "language_model" not in n and "text_model" not in n]
    assert outside, f"no vision tower norms among {sorted(norms)}"
    if kind == "instructblip":
        assert any("qformer" in n for n in norms), "the Q-Former's norms are missing"
    for name, module in norms.items():
        w = module.weight.detach()
        assert 0.5 <= float(w.min()) and float(w.max()) <= 1.5, name
        assert float((w - 1).abs().mean()) > 0.1, f"{name} is close to all ones"
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.nn.Parameter):
            assert float(bias.detach().abs().mean()) > 0.05, f"{name} has a zero bias"


def test_norms_follow_the_seed(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    a, b, c = (LlamaForCausalLM(config) for _ in range(3))
    assert randomize_norms(a, 0) == 2 * 2 + 1  # two per layer and the final norm
    randomize_norms(b, 0)
    randomize_norms(c, 1)
    assert torch.equal(a.model.norm.weight, b.model.norm.weight)
    assert not torch.equal(a.model.norm.weight, c.model.norm.weight)


def test_extract_does_not_import_toys():
    code = "import sys, vislens.extract, vislens.extract.datasets; sys.exit('vislens.toys' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
