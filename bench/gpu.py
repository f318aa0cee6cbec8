"""Every Triton kernel's benchmark on a CUDA GPU in one run (a few minutes), to one JSON file.

    bench/gpu.sh [--out PATH]      (runs this; exits with status 2 and says why without CUDA)
    python bench/gpu.py --smoke    (no GPU: the same steps at tiny shapes through the Triton
                                    interpreter on the CPU, to check this script, not to time)

For mean_cosine, norm_attention and value_gram at LLaVA-1.5-7B shapes (bench/kernels.py's), and
lens_topk at 7B and 13B shapes (one layer of 576 image rows, and one whole sample of 33 layers),
it times backend="triton" against the same computation in plain torch on the GPU, records the
peak GPU memory of one call, and checks the Triton result against torch's. A kernel that fails
to compile or run, or disagrees, is reported in the notes and the script exits with status 1
after writing every figure it has. Hook for the lead: `extraction_rows` (the extraction's cost
with and without --lens-topk on the GPU).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, at import

import torch  # noqa: E402

if "--smoke" not in sys.argv and not torch.cuda.is_available():
    print(
        "bench/gpu.py needs a CUDA GPU: torch.cuda.is_available() is False (a CPU build of torch, or "
        "no GPU). Use --smoke to check the script on the CPU.",
        file=sys.stderr,
    )
    sys.exit(2)

from _common import Row, Timing, machine, memory_bandwidth, parser, print_table, time_call, write_json  # noqa: E402
from _common import version as vislens_version  # noqa: E402
from kernels import CALLS, FULL, Shapes  # noqa: E402

from vislens.kernels import LensNorm, lens_topk  # noqa: E402

SMOKE = Shapes(3, 40, 2, 32, 64, 4, 4, 16, 32)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _peak_mb(fn: Callable[[], object]) -> float:
    """GPU memory one call adds at its peak, in MB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 1e6


def _close(a, b) -> bool:
    """Outputs (tensors or tuples of tensors) agree to 1e-3 of their largest magnitude."""
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    for x, y in zip(a, b):
        x, y = x.float().cpu(), y.float().cpu()
        if x.shape != y.shape or not torch.equal(x.isnan(), y.isnan()):
            return False
        scale = y.nan_to_num().abs().max().clamp(min=1e-30)
        if ((x - y).nan_to_num().abs().max() / scale).item() > 1e-3:
            return False
    return True


def _lens_case(rows: int, hidden: int, vocab: int, k: int, backend: str):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).half().to(DEVICE)
    x = torch.randn(rows, hidden, generator=g).half().to(DEVICE)
    norm = LensNorm("rms", 1e-6, (1 + 0.1 * torch.randn(hidden, generator=g)).to(DEVICE))
    if backend == "torch fp32 GEMM + topk":
        w32 = w.float()
        return lambda: (
            x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight @ w32.T
        ).topk(k, dim=1)
    return lambda: lens_topk(x, w, k, norm=norm, backend=backend)


def extraction_rows(args) -> list[Row]:
    """Hook: `vislens extract` on the GPU with and without --lens-topk (issue 14, item 1)."""
    return []


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU via the Triton interpreter")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    s = SMOKE if args.smoke else FULL
    repeats = 2 if args.smoke else args.repeats
    rows: list[Row] = []
    notes: list[str] = (
        ["--smoke: tiny shapes through the Triton interpreter on the CPU; not timings"] if args.smoke else []
    )
    failures: list[str] = []
    where, label = machine(), vislens_version()

    def add(operation: str, backend: str, metric: str, unit: str, shape: str, t: Timing) -> None:
        rows.append(Row(operation, backend, metric, unit, shape, t.median, t.p20, t.p80, where, label))

    def measure(operation: str, shape: str, make: Callable[[str], Callable[[], object]], backends: list[str]) -> None:
        """Time each backend's call, record its peak memory, and check it against the last one."""
        outputs = {}
        for backend in backends:
            try:
                fn = make(backend)
                add(operation, backend, "time", "s", shape, time_call(fn, repeats=repeats))
                if DEVICE == "cuda":
                    peak = _peak_mb(fn)
                    add(operation, backend, "peak memory", "MB", shape, Timing(peak, peak, peak))
                outputs[backend] = fn()
            except Exception as err:  # report, keep measuring the rest
                failures.append(f"{operation} [{backend}] failed: {type(err).__name__}: {err}")
                traceback.print_exc()
        if "triton" in outputs and backends[-1] in outputs and backends[-1] != "triton":
            if not _check(operation, outputs["triton"], outputs[backends[-1]]):
                failures.append(f"{operation}: triton disagrees with {backends[-1]}")

    def _check(operation: str, got, want) -> bool:
        if operation.startswith("lens_topk"):
            same = (got[1].cpu() == want[1].cpu()).all(-1).float().mean().item()
            notes.append(
                f"{operation}: {100 * same:.2f}% of rows have the same ids as torch (fp32 sums differ in order)"
            )
            return same >= 0.99 and _close(got[0], want[0])
        return _close(got, want)

    if not args.smoke:
        add("memory", "torch.sum", "bandwidth", "GB/s", "1 GiB fp32", memory_bandwidth("cuda"))
    hidden = f"({s.layers}, {s.tokens}, {s.hidden}) fp16"
    for case in ("image-text", "image-image"):
        operation = f"mean_cosine {case}"
        measure(operation, hidden, lambda backend, op=operation: CALLS[op](s, backend), ["triton", "torch"])
    layers = s.layers - 1
    measure(
        "norm_attention",
        f"({layers}, {s.heads}, {s.queries}, {s.tokens})",
        lambda b: CALLS["norm_attention"](s, b),
        ["triton", "torch"],
    )
    measure(
        "value_gram", f"values ({s.tokens}, {s.hidden}) fp16", lambda b: CALLS["value_gram"](s, b), ["triton", "torch"]
    )

    lens_shapes = [("7B", 4096), ("13B", 5120)] if not args.smoke else [("smoke", 64)]
    vocab = 32000 if not args.smoke else 300
    for name, d in lens_shapes:
        for rows_n, what in (
            ((576, "one layer"), (33 * 576, "one sample, 33 layers")) if not args.smoke else ((40, "smoke"),)
        ):
            for k in (1, 10):
                operation = f"lens_topk {name} {what} k={k}"
                shape = f"x ({rows_n}, {d}) fp16, W ({vocab}, {d}) fp16, RMSNorm"
                measure(
                    operation,
                    shape,
                    lambda b, r=rows_n, d=d, k=k: _lens_case(r, d, vocab, k, b),
                    ["triton", "torch fp32 GEMM + topk", "torch"],
                )
    rows += extraction_rows(args)
    if not any(r.operation.startswith("extract") for r in rows):
        notes.append("extraction with --lens-topk: not measured yet (hook extraction_rows)")
    print_table(rows)
    notes += failures
    for note in notes:
        print(note)
    print("wrote", write_json("gpu", rows, notes, args.out))
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
