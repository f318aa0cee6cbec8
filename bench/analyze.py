"""Logit-lens throughput: serial vs Dask threads vs a Dask LocalCluster of 2 workers, and cached
re-scoring vs recomputation.

A store of LLaVA-1.5-like layout is written through the store API with random hidden states
(33 layers, 600 tokens of which 576 image) and a random lens (hidden D, vocabulary V, smaller
than LLaVA's 4096 x 32000 so that a CPU run takes minutes, not hours; the cost per image token
and layer scales with D x V, which the table states). Throughput is image tokens x layers per
second.

    python bench/analyze.py [--quick] [--samples N] [--out bench/results/analyze.json]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import dask
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import Contention, Row, machine, parser, print_table, version, write_json  # noqa: E402

from vislens.analyze.logit_lens import logit_lens, logit_lens_topk  # noqa: E402
from vislens.store import IMAGE, TEXT, Layout, StoreSpec, open_store, prepare_store  # noqa: E402
from vislens.store.create import CaptionData, LensData  # noqa: E402
from vislens.store.location import StoreLocation  # noqa: E402

WORDS = "cat dog red blue grass sky man woman car street table food plate tree water".split()


def build_store(path: Path, samples: int, layers: int, tokens: int, n_image: int, hidden: int, vocab: int) -> str:
    """A finished store of random states with the given layout."""
    rng = np.random.default_rng(0)
    layout = Layout(samples, layers, tokens, hidden, n_heads=0, n_query=0, vocab=vocab, n_images=samples, n_captions=2)
    strings = lambda values: np.asarray(values, dtype=np.dtypes.StringDType())  # noqa: E731
    vocab_text = [f" {WORDS[i % len(WORDS)]}" if i % 3 == 0 else f"x{i}" for i in range(vocab)]
    spec = StoreSpec(
        layout=layout,
        attrs={"model": {"name_or_path": "bench"}},
        fingerprint="bench",
        plan={
            "image_id": strings([f"img{i}" for i in range(samples)]),
            "prompt_kind": strings(["normal"] * samples),
            "prompt_id": strings(["0"] * samples),
            "prompt_text": strings(["describe"] * samples),
            "image_index": np.arange(samples, dtype=np.int32),
        },
        captions=CaptionData([f"img{i}" for i in range(samples)], [("a cat on grass", "a red car")] * samples),
        lens=LensData(
            rng.standard_normal((vocab, hidden)).astype(np.float16),
            "rms",
            1e-6,
            np.ones(hidden, np.float32),
            None,
            vocab_text,
            np.zeros(vocab, bool),
        ),
        layer_attrs={"final_norm_applied_to_last": 1},
    )
    writer = prepare_store(StoreLocation(str(path)), spec)
    modality = np.full(tokens, TEXT, np.uint8)
    modality[5 : 5 + n_image] = IMAGE
    for i in range(samples):
        writer.write_sample(
            i,
            {
                "hidden": rng.standard_normal((layers, tokens, hidden)).astype(np.float16),
                "modality": modality,
                "n_tokens": np.int32(tokens),
                "token_id": np.zeros(tokens, np.int32),
            },
        )
    return str(path)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--samples", type=int, default=None)
    args = p.parse_args()
    if args.quick:
        samples, layers, tokens, n_image, hidden, vocab = args.samples or 4, 5, 40, 32, 64, 512
    else:
        samples, layers, tokens, n_image, hidden, vocab = args.samples or 8, 33, 600, 576, 512, 4096
    shape = f"{samples} samples x {layers} layers x {n_image} image tokens, D={hidden}, V={vocab}"
    units = samples * layers * n_image
    contention = Contention()
    rows: list[Row] = []

    def row(backend: str, seconds: float) -> None:
        rate = units / seconds
        rows.append(
            Row(
                "logit_lens_topk",
                backend,
                "throughput",
                "image-token-layers/s",
                shape,
                rate,
                rate,
                rate,
                machine(),
                version(),
            )
        )
        rows.append(
            Row("logit_lens_topk", backend, "time", "s", shape, seconds, seconds, seconds, machine(), version())
        )

    with tempfile.TemporaryDirectory() as tmp:
        url = build_store(Path(tmp) / "bench.zarr", samples, layers, tokens, n_image, hidden, vocab)
        tree = open_store(url)
        logit_lens_topk(tree, 1).isel(sample=[0]).compute()  # warm up torch and the store
        threads = torch.get_num_threads()
        with dask.config.set(scheduler="synchronous"):
            row(f"serial, torch {threads} threads", timed(lambda: logit_lens_topk(tree, 1).compute()))
        torch.set_num_threads(1)  # from here on Dask supplies the parallelism
        with dask.config.set(scheduler="synchronous"):
            row("serial, torch 1 thread", timed(lambda: logit_lens_topk(tree, 1).compute()))
        with dask.config.set(scheduler="threads", num_workers=2):
            row("dask 2 threads, torch 1 thread each", timed(lambda: logit_lens_topk(tree, 1).compute()))
        from distributed import Client, LocalCluster

        with (
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
            Client(cluster, set_as_default=False) as client,
        ):
            client.run(torch.set_num_threads, 1)  # workers up, one torch thread each
            with dask.config.set(scheduler=client):
                row("dask LocalCluster 2 workers", timed(lambda: logit_lens_topk(tree, 1).compute()))
        torch.set_num_threads(threads)
        first = timed(lambda: logit_lens(tree, top_k=1, cache=True))  # computes and caches
        cached_tree = open_store(url)
        again = timed(lambda: logit_lens(cached_tree, top_k=1, cache=True))  # re-scores from results/
        rows.append(
            Row(
                "logit_lens (score)", "recompute + cache", "time", "s", shape, first, first, first, machine(), version()
            )
        )
        rows.append(
            Row("logit_lens (score)", "from cache", "time", "s", shape, again, again, again, machine(), version())
        )
    print_table(rows)
    by = {r.backend: r.median for r in rows if r.metric == "throughput"}
    base = by["serial, torch 1 thread"]
    notes = [
        f"against serial with one torch thread: LocalCluster of 2 workers {by['dask LocalCluster 2 workers'] / base:.2f}x, "
        f"2 Dask threads {by['dask 2 threads, torch 1 thread each'] / base:.2f}x, "
        f"torch's own {by[f'serial, torch {torch.get_num_threads()} threads'] / base:.2f}x",
        f"cached re-scoring vs recomputation: {first / again:.1f}x faster",
        contention.note(),
    ]
    for note in notes:
        print(note)
    print(f"wrote {write_json('analyze', rows, notes, args.out)}")


if __name__ == "__main__":
    main()
