"""Extraction: what it costs beyond the model, and what --keep / --compute / --layers save.

On a toy LLaVA with 576 image tokens per image (the study's LLaVA-1.5 count; 96 px images, 4 px
patches, a 6-layer decoder), in one run on the same model and images:

- floor: the model's bare forward loop with ``output_hidden_states=True`` (processor included),
  nothing written;
- torch.save: the same loop writing each sample's hidden states with ``torch.save``;
- vislens ``--attention none`` (hidden states only), then ``--keep all`` (hidden + attention),
  ``--keep none --compute cosine,norm-attention,lens`` and ``--layers 0:7:2`` (the toy's analogue of
  ``0:33:4``): wall time per sample, bytes on disk per sample, and the ratio to the floor;
- peak memory (resident-set high-water mark in a fresh process) of the floor and of vislens.

Then the storage arithmetic at LLaVA-1.5-7B shapes (33 hidden states x 620 tokens x 4096, 32
heads, 44 text query rows, vocabulary 32000): one synthetic sample written through the real
writer for ``--keep all`` and for statistics only, bytes on disk per sample, and what 600 images x
3 prompts would take. (Synthetic Gaussian states: real ones compress about as well, see
docs/store-format.md.)

    python bench/extract.py [--quick] [--out PATH]
"""

from __future__ import annotations

import functools
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import Contention, Row, machine, parser, peak_memory, print_table, version, write_json  # noqa: E402

from vislens.extract import ExtractConfig, extract  # noqa: E402
from vislens.toys import ToySpec, build_toy_model  # noqa: E402
from vislens.toys.shapes import make_shapes  # noqa: E402

SPEC = ToySpec(layers=6, hidden=64, heads=4, kv_heads=2, image_size=96, patch_size=4, seed=0)  # 576 image tokens


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _bare_loop(model_path: Path, manifest: Path, n: int, out: Path | None = None) -> float:
    """Seconds of the bare forward loop (batch 4), writing torch.save files into ``out`` if given."""
    import json

    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_path, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(model_path)
    records = [json.loads(line) for line in manifest.read_text().splitlines()][:n]
    text = "USER: <image>\nDescribe the image. ASSISTANT:"
    begin = time.perf_counter()
    for first in range(0, len(records), 4):
        batch = records[first : first + 4]
        images = [Image.open(manifest.parent / r["image"]).convert("RGB") for r in batch]
        inputs = processor(images=images, text=[text] * len(batch), return_tensors="pt", padding=True)
        with torch.inference_mode():
            states = torch.stack(model(**inputs, output_hidden_states=True).hidden_states).to(torch.float16)
        if out is not None:
            for b, record in enumerate(batch):
                torch.save(states[:, b].clone(), out / f"{record['id']}.pt")
    return time.perf_counter() - begin


def _vislens(model_path: Path, manifest: Path, n: int, out: Path, **options) -> float:
    config = ExtractConfig(
        model=str(model_path),
        data=str(manifest),
        out=str(out),
        prompt="Describe the image.",
        limit=n,
        batch_size=4,
        progress=False,
        **options,
    )
    begin = time.perf_counter()
    extract(config)
    return time.perf_counter() - begin


def _peak_setup(kind: str, model_path: str, manifest: str, n: int):
    folder = Path(tempfile.mkdtemp())

    def run():
        if kind == "floor":
            _bare_loop(Path(model_path), Path(manifest), n)
        else:
            _vislens(Path(model_path), Path(manifest), n, folder / f"s{time.perf_counter_ns()}.zarr", attention="none")

    return run, run


def _rows_toy(n: int, repeats: int) -> tuple[list[Row], list[str]]:
    root = Path(tempfile.mkdtemp(prefix="vislens-bench-extract-"))
    try:
        model = build_toy_model(root / "model", SPEC)
        manifest = make_shapes(root / "data", n=n, start=0)
        for line in manifest.read_text().splitlines():  # 96 px images: 24 x 24 = 576 patches
            import json

            from PIL import Image

            path = manifest.parent / json.loads(line)["image"]
            Image.open(path).convert("RGB").resize((96, 96)).save(path)
        variants = {
            "vislens --attention none": dict(attention="none"),
            "vislens --keep all (attention text)": dict(attention="text"),
            "vislens --keep none --compute cosine,norm-attention,lens": dict(
                attention="text", keep=(), compute=("cosine", "norm-attention", "lens")
            ),
            "vislens --layers 0:7:2 --attention none": dict(attention="none", layers="0:7:2"),
        }
        times: dict[str, list[float]] = {
            "floor (bare forward loop)": [],
            "torch.save loop": [],
            **{k: [] for k in variants},
        }
        sizes: dict[str, int] = {}
        _bare_loop(model, manifest, n)  # warm-up: JIT, caches
        _vislens(model, manifest, n, root / "warm.zarr", attention="none")
        for r in range(repeats):  # interleaved, so drifts in load hit every variant alike
            times["floor (bare forward loop)"].append(_bare_loop(model, manifest, n))
            saved = root / f"pt{r}"
            saved.mkdir()
            times["torch.save loop"].append(_bare_loop(model, manifest, n, saved))
            sizes["torch.save loop"] = _folder_bytes(saved)
            shutil.rmtree(saved)
            for name, options in variants.items():
                out = root / f"v{r}.zarr"
                times[name].append(_vislens(model, manifest, n, out, **options))
                sizes[name] = _folder_bytes(out)
                shutil.rmtree(out)
        rows, shape = [], f"{n} samples x 577 tokens, 6 layers, d 64"
        floor = float(np.median(times["floor (bare forward loop)"]))
        for name, values in times.items():
            t = np.array(values) / n
            rows.append(
                Row(
                    "extract",
                    name,
                    "wall per sample",
                    "s",
                    shape,
                    float(np.median(t)),
                    *map(float, np.percentile(t, [20, 80])),
                    machine(),
                    version(),
                )
            )
            ratio = np.array(values) / floor
            rows.append(
                Row(
                    "extract",
                    name,
                    "wall / floor",
                    "x",
                    shape,
                    float(np.median(ratio)),
                    *map(float, np.percentile(ratio, [20, 80])),
                    machine(),
                    version(),
                )
            )
            if name in sizes:
                b = sizes[name] / n
                rows.append(Row("extract", name, "bytes on disk per sample", "B", shape, b, b, b, machine(), version()))
        args = (str(model), str(manifest), n)
        for kind in ("floor", "vislens"):
            peak = peak_memory(functools.partial(_peak_setup, kind, *args)) / 2**20
            rows.append(
                Row(
                    "extract", kind, "peak memory (fresh process)", "MiB", shape, peak, peak, peak, machine(), version()
                )
            )
        return rows, []
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _rows_7b() -> tuple[list[Row], list[str]]:
    """Bytes on disk of one LLaVA-7B-shaped sample through the real writer: --keep all vs statistics only."""
    from vislens.store import as_location, prepare_store
    from vislens.store.create import CaptionData, StoreSpec
    from vislens.store.schema import Layout

    layers, tokens, d, heads, query, vocab, image = 33, 620, 4096, 32, 44, 32000, 576
    rng = np.random.default_rng(0)
    common = dict(
        n_samples=1, n_layers=layers, n_tokens=tokens, d_model=d, n_heads=heads, vocab=vocab, n_images=1, n_captions=1
    )
    plan = {
        "image_id": np.asarray(["0"], dtype=np.dtypes.StringDType()),
        "prompt_kind": np.asarray(["normal"], dtype=np.dtypes.StringDType()),
        "prompt_id": np.asarray(["0"], dtype=np.dtypes.StringDType()),
        "prompt_text": np.asarray(["x"], dtype=np.dtypes.StringDType()),
        "image_index": np.zeros(1, dtype=np.int32),
    }
    small = {
        "token_id": rng.integers(0, vocab, tokens).astype(np.int32),
        "modality": np.r_[np.full(image, 1), np.full(tokens - image, 2)].astype(np.uint8),
        "token_role": np.r_[np.full(image, 1), np.full(tokens - image, 2)].astype(np.uint8),
        "n_tokens": np.int32(tokens),
        "image_grid": np.array([24, 24], dtype=np.int32),
    }
    full = {
        **small,
        "hidden": rng.standard_normal((layers, tokens, d), dtype=np.float32).astype(np.float16),
        "attn": rng.random((layers - 1, heads, query, tokens), dtype=np.float32).astype(np.float16),
        "value_gram": rng.standard_normal((layers - 1, tokens, heads, heads), dtype=np.float32),
        "query_pos": np.arange(image, tokens, dtype=np.int32),
    }
    ids = np.full((layers, tokens, 5), -1, np.int32)
    ids[:, :image] = rng.integers(0, vocab, (layers, image, 5))
    values = np.full((layers, tokens, 5), np.nan, np.float32)
    values[:, :image] = -np.sort(-rng.standard_normal((layers, image, 5)), axis=-1)
    stats = {
        **small,
        "cosine": rng.random((layers, 3, 3), dtype=np.float32),
        "image_share": rng.random(layers - 1, dtype=np.float32),
        "image_share_after_image": rng.random(layers - 1, dtype=np.float32),
        "last_query": rng.random((layers - 1, tokens), dtype=np.float32),
        "logit_lens_topk": ids,
        "logit_lens_topk_values": values,
    }
    rows, notes = [], []
    root = Path(tempfile.mkdtemp(prefix="vislens-bench-7b-"))
    try:
        results = {}
        for name, layout, arrays in (
            ("--keep all", Layout(n_query=query, **common), full),
            (
                "--keep none --compute cosine,norm-attention,lens",
                Layout(
                    n_query=query,
                    keep_hidden=False,
                    keep_attention=False,
                    stats=("cosine", "norm-attention", "lens"),
                    lens_k=5,
                    **common,
                ),
                stats,
            ),
        ):
            folder = root / f"{len(results)}.zarr"
            spec = StoreSpec(
                layout=layout, attrs={}, fingerprint=name, plan=plan, captions=CaptionData(["0"], [("x",)])
            )
            writer = prepare_store(as_location(str(folder)), spec)
            before = _folder_bytes(folder)
            writer.write_sample(0, arrays)
            results[name] = _folder_bytes(folder) - before
            rows.append(
                Row(
                    "store",
                    name,
                    "bytes per sample at LLaVA-7B shapes",
                    "B",
                    "33 x 620 x 4096",
                    results[name],
                    results[name],
                    results[name],
                    machine(),
                    version(),
                )
            )
        raw_hidden = layers * tokens * d * 2
        for name, b in results.items():
            notes.append(
                f"{name}: {b / 1e6:.1f} MB per LLaVA-7B sample on disk; 600 images x 3 prompts: {1800 * b / 1e9:.1f} GB"
            )
        notes.append(
            f"(hidden states alone, raw: {raw_hidden / 1e6:.0f} MB per sample; 13B: {41 * tokens * 5120 * 2 / 1e6:.0f} MB)"
        )
        return rows, notes
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    args = parser(__doc__).parse_args()
    watch = Contention()
    n, repeats = (8, 1) if args.quick else (32, 3)
    rows, notes = _rows_toy(n, repeats)
    more_rows, more_notes = _rows_7b()
    rows += more_rows
    notes += more_notes + [watch.note()]
    print_table(rows)
    for note in notes:
        print(note)
    print(f"wrote {write_json('extract', rows, notes, args.out)}")


if __name__ == "__main__":
    main()
