"""Benchmark of vislens.kernels at LLaVA-1.5-7B shapes, against the naive computations.

One sample: 33 hidden states (embeddings + 32 layers) of 600 tokens, 576 of them image tokens,
D = 4096, H = 32 heads; 40 text query rows for norm attention (32 layers). For each backend that
can run here (numba and torch on CPU; Triton only on a GPU) it reports time, achieved GB/s (the
bytes a kernel must read and write, over its time), that as a share of the memory bandwidth
measured in the same run, and the extra peak memory of one call, measured in a fresh process
after all timings.
Baselines: (a) naive all-pairs cosine (normalise, matmul, mean); (b) the reference norm analysis,
which materialises alpha * f(x), run at a reduced size and extrapolated. Targets are checked
at the end. Writes bench/results/kernels.json (long-format rows).

    python bench/kernels.py [--quick] [--out PATH]
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from _common import (
    Contention,
    Row,
    Timing,
    machine,
    memory_bandwidth,
    parser,
    peak_memory,
    print_table,
    rate,
    time_call,
    write_json,
)
from _common import version as vislens_version

from vislens.kernels import mean_cosine, norm_attention, value_gram
from vislens.kernels.mean_cosine import reference as cosine_reference
from vislens.kernels.norm_attention import reference as norm_reference
from vislens.kernels.value_gram import reference as gram_reference

GB, MB = 1e9, 1e6


@dataclass(frozen=True)
class Shapes:
    layers: int = 33  # hidden states; attention layers are one fewer
    tokens: int = 600
    image_start: int = 5
    image: int = 576
    hidden: int = 4096
    heads: int = 32
    queries: int = 40
    reduced_tokens: int = 64  # the materialising reference runs on one layer at reduced N and D
    reduced_hidden: int = 512

    @property
    def text(self) -> int:
        return self.tokens - self.image


FULL = Shapes()
QUICK = Shapes(5, 120, 5, 96, 512, 8, 8, 32, 128)
TINY = Shapes(2, 16, 2, 8, 64, 4, 2, 8, 16)  # warms the JIT with the same dtypes and code paths


def _device(backend: str) -> str:
    return "cpu" if backend == "numba" or not torch.cuda.is_available() else "cuda"


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _cosine(s: Shapes, backend: str, case: str, samples: int = 0):
    """mean_cosine over all layers of one sample (or of `samples` samples at once, more than the
    260 MB L3 cache holds); masks pick image and text tokens as stored."""
    lead = (samples, s.layers) if samples else (s.layers,)
    h = torch.from_numpy(np.empty((*lead, s.tokens, s.hidden), np.float16))  # huge pages, as stores
    h.copy_(torch.randn(h.shape, generator=_generator()) * 2)
    h = h.to(_device(backend))
    image_rows = slice(s.image_start, s.image_start + s.image)
    if backend == "naive":
        a = h[..., image_rows, :].contiguous()
        text = (h[..., : s.image_start, :], h[..., image_rows.stop :, :])
        b = a if case == "image-image" else torch.cat(text, -2)
        return lambda: cosine_reference.mean_cosine(a, b)
    if case == "image-image":
        image = h[..., image_rows, :]
        return lambda: mean_cosine(image, image, backend=backend)
    is_image = torch.zeros(h.shape[:-1], dtype=torch.bool, device=h.device)
    is_image[..., image_rows] = True
    return lambda: mean_cosine(h, h, a_mask=is_image, b_mask=~is_image, backend=backend)


def _attention(s: Shapes, backend: str):
    """Attention rows of the text queries and Gram matrices of all 32 layers of one sample."""
    g, layers = _generator(), s.layers - 1
    attn = torch.softmax(torch.randn(layers, s.heads, s.queries, s.tokens, generator=g) * 3, -1).half()
    f = torch.randn(layers, s.tokens, s.heads, 16, generator=g)
    gram = f @ f.transpose(-1, -2)
    device = _device(backend)
    attn, gram = attn.to(device), gram.to(device)
    return lambda: norm_attention(attn, gram, backend=backend)


def _attention_reference(s: Shapes, backend: str):
    """The materialising reference on one layer at reduced N and D (alpha * f: H x Q x N' x D')."""
    g = _generator()
    attn = torch.softmax(torch.randn(s.heads, s.queries, s.reduced_tokens, generator=g), -1).half()
    f = torch.randn(s.reduced_tokens, s.heads, s.reduced_hidden, generator=g)
    return lambda: norm_reference.norm_attention_from_values(attn, f)


def _value_gram(s: Shapes, backend: str):
    """One layer: v_proj output (N, D) fp16 and o_proj.weight (D, D) fp16."""
    g = _generator()
    values = torch.randn(1, s.tokens, s.hidden, generator=g).half()
    w_o = (torch.randn(s.hidden, s.hidden, generator=g) / s.hidden**0.5).half()
    if backend == "naive":
        return lambda: gram_reference.value_gram(values, w_o, s.heads)
    device = _device(backend)
    values, w_o = values.to(device), w_o.to(device)
    return lambda: value_gram(values, w_o, s.heads, backend=backend)


LARGE = 4  # samples of the beyond-cache mean_cosine cases: 4 x 162 MB, against a 260 MB L3

CALLS = {
    "mean_cosine image-text": functools.partial(_cosine, case="image-text"),
    "mean_cosine image-image": functools.partial(_cosine, case="image-image"),
    f"mean_cosine image-text, {LARGE} samples": functools.partial(_cosine, case="image-text", samples=LARGE),
    f"mean_cosine image-image, {LARGE} samples": functools.partial(_cosine, case="image-image", samples=LARGE),
    "norm_attention": _attention,
    "norm_attention reference": _attention_reference,
    "value_gram": _value_gram,
}


def _setup(operation: str, s: Shapes, backend: str):
    """(warm, run) for peak_memory: the same call on TINY shapes, then on s."""
    return CALLS[operation](TINY, backend), CALLS[operation](s, backend)


def main() -> None:
    args = parser(__doc__).parse_args()
    s = QUICK if args.quick else FULL
    repeats = 3 if args.quick else 10
    backends = ["numba", "torch"] + (["triton"] if torch.cuda.is_available() else [])
    notes = [] if torch.cuda.is_available() else ["triton: not measured: no GPU"]
    rows: list[Row] = []
    contention = Contention()
    where, label = machine(), vislens_version()

    def add(operation: str, backend: str, metric: str, unit: str, shape: str, t: Timing) -> None:
        rows.append(Row(operation, backend, metric, unit, shape, t.median, t.p20, t.p80, where, label))

    measured: list[tuple[str, str, str]] = []  # peak memory comes after all timings

    def measure(operation: str, backend: str, shape: str, runs: int = repeats) -> Timing:
        t = time_call(CALLS[operation](s, backend), repeats=runs)
        add(operation, backend, "time", "s", shape, t)
        measured.append((operation, backend, shape))
        return t

    bandwidth = memory_bandwidth("cuda" if torch.cuda.is_available() else "cpu")
    add("memory", "torch.sum", "bandwidth", "GB/s", "1 GiB fp32, all threads", bandwidth)

    hidden = f"({s.layers}, {s.tokens}, {s.hidden}) fp16"
    moved = {"image-text": s.layers * s.tokens * s.hidden * 2, "image-image": s.layers * s.image * s.hidden * 2}
    for case, nbytes in moved.items():
        operation = f"mean_cosine {case}"
        naive = measure(operation, "naive", hidden, runs=3)
        for backend in backends:
            t = measure(f"{operation}, {LARGE} samples", backend, f"({LARGE}, {hidden[1:]}")
            _bandwidth_rows(
                add, f"{operation}, {LARGE} samples", backend, f"({LARGE}, {hidden[1:]}", LARGE * nbytes, t, bandwidth
            )
        for backend in backends:
            t = measure(operation, backend, hidden)
            _bandwidth_rows(add, operation, backend, hidden, nbytes, t, bandwidth)
            add(
                operation,
                backend,
                "speedup vs naive",
                "x",
                hidden,
                Timing(naive.median / t.median, naive.median / t.p80, naive.median / t.p20),
            )

    layers = s.layers - 1
    shape = (
        f"attn ({layers}, {s.heads}, {s.queries}, {s.tokens}) fp16, gram ({layers}, {s.tokens}, {s.heads}, {s.heads})"
    )
    nbytes = layers * (s.heads * s.queries * s.tokens * (2 + 4) + s.tokens * s.heads**2 * 4 + s.queries * s.tokens * 4)
    for backend in backends:
        t = measure("norm_attention", backend, shape)
        add("norm_attention", backend, "achieved bandwidth", "GB/s", shape, rate(nbytes / GB, t))
    reduced = f"1 layer, alpha*f ({s.heads}, {s.queries}, {s.reduced_tokens}, {s.reduced_hidden}) fp32"
    t = measure("norm_attention reference", "naive", reduced, runs=3)
    factor = layers * (s.tokens / s.reduced_tokens) * (s.hidden / s.reduced_hidden)
    add(
        "norm_attention reference",
        "naive",
        f"time, extrapolated x{factor:.0f}",
        "s",
        shape,
        Timing(t.median * factor, t.p20 * factor, t.p80 * factor),
    )
    materialised = s.heads * s.queries * s.tokens * s.hidden * 4 / GB
    notes.append(
        f"norm_attention reference at full size materialises {materialised:.3g} GB per layer for "
        f"{s.queries} query rows ({materialised * s.tokens / s.queries:.3g} GB for all (H, N, N, D))"
    )

    shape = f"values ({s.tokens}, {s.hidden}) fp16, w_o ({s.hidden}, {s.hidden}) fp16"
    flops = 2 * s.tokens * s.hidden * s.hidden + 2 * s.tokens * s.heads**2 * s.hidden
    for backend in ["naive", *backends]:
        t = measure("value_gram", backend, shape, runs=3)
        add("value_gram", backend, "compute", "GFLOP/s", shape, rate(flops / GB, t))

    notes.append(contention.note())  # the timings above are what other processes disturb
    for operation, backend, shape in measured:
        peak = peak_memory(functools.partial(_setup, operation, s, backend)) / MB
        add(operation, backend, "peak memory", "MB", shape, Timing(peak, peak, peak))
    operations = list(dict.fromkeys(r.operation for r in rows))
    rows.sort(key=lambda r: operations.index(r.operation))  # each operation's rows together
    print_table(rows)
    notes += _targets(rows, s)
    for note in notes:
        print(note)
    print("wrote", write_json("kernels", rows, notes, args.out))


def _bandwidth_rows(add, operation: str, backend: str, shape: str, nbytes: int, t: Timing, bandwidth: Timing) -> None:
    """Achieved GB/s and its share of the measured memory bandwidth."""
    achieved = rate(nbytes / GB, t)
    add(operation, backend, "achieved bandwidth", "GB/s", shape, achieved)
    share = Timing(*(100 * x / bandwidth.median for x in (achieved.median, achieved.p20, achieved.p80)))
    add(operation, backend, "of measured bandwidth", "%", shape, share)


def _targets(rows: list[Row], s: Shapes) -> list[str]:
    value = {(r.operation, r.backend, r.metric): r.median for r in rows}
    checks = [
        (
            "mean_cosine fp16 image-text >= 80% of bandwidth (numba)",
            value["mean_cosine image-text", "numba", "of measured bandwidth"] >= 80,
        ),
        (
            "mean_cosine fp16 image-image >= 80% of bandwidth (numba)",
            value["mean_cosine image-image", "numba", "of measured bandwidth"] >= 80,
        ),
        (
            f"mean_cosine fp16 image-text, {LARGE} samples (beyond L3) >= 90% of bandwidth (numba)",
            value[f"mean_cosine image-text, {LARGE} samples", "numba", "of measured bandwidth"] >= 90,
        ),
        (
            f"mean_cosine fp16 image-image, {LARGE} samples (beyond L3) >= 90% of bandwidth (numba)",
            value[f"mean_cosine image-image, {LARGE} samples", "numba", "of measured bandwidth"] >= 90,
        ),
        (
            "mean_cosine image-image >= 10x faster than naive all-pairs (numba)",
            value["mean_cosine image-image", "numba", "speedup vs naive"] >= 10,
        ),
        ("norm_attention, all layers of one sample, <= 1 s (numba)", value["norm_attention", "numba", "time"] <= 1),
        ("norm_attention peak memory <= 1 GB (numba)", value["norm_attention", "numba", "peak memory"] <= 1000),
    ]
    scale = "" if s == FULL else " [--quick shapes: not the targets' shapes]"
    return [f"target: {name}: {'met' if ok else 'NOT met'}{scale}" for name, ok in checks]


if __name__ == "__main__":
    main()
