"""How much the final norm moves the inter-modal cosine at the last layer, on the shipped trained toys.

vislens stores transformers' ``hidden_states[L]``, the output of decoder layer L already passed
through the final norm (docs/methods.md, analysis 2). This script compares, per sample, the
instruction cosine ``mean_i(v_i/|v_i|) . mean_j(w_j/|w_j|)`` of those normed states with that of
the raw output of layer L (a forward hook), on the first ``--n`` held-out scenes under the normal
prompts as extraction cycles them (image i gets prompt i mod 10). Not collected by pytest.

    python dev/last_layer_cosine.py [--n 48]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from vislens.extract.adapters import adapter_class
from vislens.extract.prompts import normal_prompts
from vislens.store.schema import ROLE_INSTRUCTION
from vislens.toys.evaluate import held_out
from vislens.toys.trained import TRAINED_FAMILIES, load_trained_toy


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """1/(m n) sum_i sum_j cos(a_i, b_j) for a (m, d), b (n, d)."""
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    return float(a.mean(0) @ b.mean(0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=48, help="held-out scenes")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    prompts = normal_prompts()
    for family in TRAINED_FAMILIES:
        model, processor = load_trained_toy(family)
        adapter = adapter_class(model.config.model_type)(model, processor)
        images, _ = held_out(args.n)
        normed_minus_raw = []
        for i, image in enumerate(images):
            prompt = prompts[i % len(prompts)].text
            text = adapter.format_prompt(prompt)
            inputs = adapter.encode([image], [text])
            raw: dict[str, torch.Tensor] = {}

            def keep(module, args, output, raw=raw):
                raw["h"] = output[0] if isinstance(output, tuple) else output

            hook = adapter.layers[-1].register_forward_hook(keep)
            try:
                with torch.no_grad():
                    normed = adapter.hidden_states(adapter.forward(inputs))[-1][0]
            finally:
                hook.remove()
            last = raw["h"][0]
            torch.testing.assert_close(adapter.final_norm(last), normed)  # hidden_states[L] is norm(raw)
            image_mask = adapter.image_mask(inputs)[0]
            roles = adapter.token_roles(inputs["input_ids"][0].numpy(), image_mask.numpy(), text, prompt)
            instruction = torch.from_numpy(roles == ROLE_INSTRUCTION)
            normed_minus_raw.append(
                mean_cosine(normed[image_mask], normed[instruction]) - mean_cosine(last[image_mask], last[instruction])
            )
        d = np.array(normed_minus_raw)
        print(
            f"{family}: cosine at layer L, final-normed minus raw, per sample: "
            f"min {d.min():.3f} max {d.max():.3f} mean {d.mean():.3f} median |d| {np.median(np.abs(d)):.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
