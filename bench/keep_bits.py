"""The effect of lossy ``--keep-bits N`` on the stored hidden states and on every analysis.

Extracts the same samples of the embedded tiny LLaVA losslessly and with N kept mantissa bits,
then compares: bytes of ``hidden`` on disk, the hidden states' largest relative error, the cosine
similarities, the logit lens's top-1 ids and scores, and norm-based attention (whose inputs,
``attn`` and ``value_gram``, are never rounded). Prints a table and writes JSON rows.

    python bench/keep_bits.py [--quick] [--out bench/results/keep_bits.json]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import Row, machine, parser, version, write_json  # noqa: E402

from vislens.analyze import cosine, logit_lens, logit_lens_topk, norm_attention  # noqa: E402
from vislens.extract import ExtractConfig, extract  # noqa: E402
from vislens.store import open_store  # noqa: E402
from vislens.store.inspect import info  # noqa: E402
from vislens.toys import toy_model_path  # noqa: E402

BITS = (None, 7, 5, 3)


def _store(root: Path, bits: int | None, n_images: int) -> str:
    out = str(root / f"bits-{bits or 10}.zarr")
    extract(
        ExtractConfig(
            model=str(toy_model_path()),
            data=f"synthetic:{n_images}",
            out=out,
            keep_bits=bits,
            prompts=("normal", "noisy", "empty"),
            batch_size=8,
            progress=False,
        )
    )
    return out


def main() -> None:
    args = parser(__doc__).parse_args()
    n_images = 8 if args.quick else 48
    rows, shape = [], f"toy LLaVA, {n_images} images x 3 prompts"
    with tempfile.TemporaryDirectory() as tmp:
        stores = {bits: _store(Path(tmp), bits, n_images) for bits in BITS}
        base = open_store(stores[None])
        base_h = base["activations"]["hidden"].values.astype(np.float32)
        base_size = next(v.stored_bytes for v in info(stores[None])["variables"] if v.path == "activations/hidden")
        base_cos, base_top = cosine(base), logit_lens_topk(base, 1).compute().values
        base_ll, base_na = logit_lens(base, cache=False), norm_attention(base)
        print(
            f"{'keep bits':>9} {'size':>6} {'max rel err':>11} {'cosine diff':>11} {'top-1 agree':>11} "
            f"{'P/R diff':>9} {'NA share diff':>13}"
        )
        for bits in BITS:
            tree = open_store(stores[bits])
            h = tree["activations"]["hidden"].values.astype(np.float32)
            finite = np.isfinite(base_h) & (np.abs(base_h) > 1e-3)
            err = float(np.max(np.abs(h[finite] - base_h[finite]) / np.abs(base_h[finite])))
            size = next(v.stored_bytes for v in info(stores[bits])["variables"] if v.path == "activations/hidden")
            cos_diff = float(np.abs(cosine(tree)["inter_modal"] - base_cos["inter_modal"]).max())
            top = logit_lens_topk(tree, 1).compute().values
            image = base_top >= 0
            agree = float((top[image] == base_top[image]).mean())
            ll = logit_lens(tree, cache=False)
            pr_diff = float(
                max(
                    np.abs(ll["precision"] - base_ll["precision"]).max(), np.abs(ll["recall"] - base_ll["recall"]).max()
                )
            )
            na_diff = float(np.abs(norm_attention(tree)["image_share"] - base_na["image_share"]).max())
            values = {
                "size vs lossless": (size / base_size, "ratio"),
                "hidden max relative error": (err, "1"),
                "cosine max abs diff": (cos_diff, "1"),
                "logit-lens top-1 agreement": (agree, "fraction"),
                "precision/recall max abs diff": (pr_diff, "1"),
                "norm-attention share max abs diff": (na_diff, "1"),
            }
            for metric, (value, unit) in values.items():
                rows.append(
                    Row("keep_bits", str(bits or 10), metric, unit, shape, value, value, value, machine(), version())
                )
            print(
                f"{bits or 10:>9} {size / base_size:>6.3f} {err:>11.2e} {cos_diff:>11.2e} {agree:>11.4f} {pr_diff:>9.4f} {na_diff:>13.2e}"
            )
    path = write_json("keep_bits", rows, [f"{shape}; attention arrays are never rounded"], args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
