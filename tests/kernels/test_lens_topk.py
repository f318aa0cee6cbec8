"""lens_topk against its reference: odd shapes, norms, ties, and the CPU path's certificate."""

from __future__ import annotations

import dataclasses
import math
import pickle
from fractions import Fraction

import numpy as np
import pytest
import torch

from vislens.errors import BackendUnavailableError
from vislens.kernels import LensNorm, lens_topk, prepare_unembedding
from vislens.kernels.lens_topk import numba as cpu
from vislens.kernels.lens_topk import reference, screen
from vislens.kernels.lens_topk import triton as gpu

# Backends other than numba sum fp32 logits in their own order: values match the correctly
# rounded reference to this relative tolerance, and ids exactly (no near-ties in these data).
VALUE_TOLERANCE = 1e-5


def _inputs(rows: int, d: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(rows, d, generator=g) * 3).to(dtype)
    weight = (torch.randn(vocab, d, generator=g) * (1 + torch.rand(vocab, 1, generator=g))).to(dtype)
    return hidden, weight


def _norm(kind: str | None, d: int) -> LensNorm | None:
    if kind is None:
        return None
    g = torch.Generator().manual_seed(1)
    weight = torch.rand(d, generator=g) + 0.5
    if kind == "rms_offset":
        return LensNorm(kind, 1e-6, weight - 1)
    bias = torch.randn(d, generator=g) * 0.1 if kind == "layer" else None
    return LensNorm(kind, 1e-5, weight, bias)


def _check(got, want, backend: str) -> None:
    (values, ids), (want_values, want_ids) = got, want
    assert ids.dtype == torch.int64 and values.dtype == torch.float32
    assert torch.equal(ids.cpu(), want_ids)
    if backend == "numba":  # exact
        assert torch.equal(values.cpu(), want_values)
    else:
        scale = want_values.abs().max()
        assert ((values.cpu() - want_values).abs().max() / scale).item() <= VALUE_TOLERANCE


@pytest.mark.parametrize("k", [1, 10])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_matches_reference(backend, device, dtype, k):
    """70 rows (two Triton row blocks, the second partial), vocabulary 2500 (many tiles, the
    last partial), d = 67 (not a multiple of any block), the RMS norm applied on the fly."""
    hidden, weight = _inputs(70, 67, 2500, dtype)
    norm = _norm("rms", 67)
    want = reference.lens_topk(hidden, weight, k, norm)
    got = lens_topk(hidden.to(device), weight.to(device), k, norm=norm, backend=backend)
    _check(got, want, backend)


@pytest.mark.parametrize("kind", [None, "rms", "rms_offset", "layer"])
def test_norm_kinds(backend, device, kind):
    hidden, weight = _inputs(19, 40, 300, torch.float16, seed=2)
    norm = _norm(kind, 40)
    want = reference.lens_topk(hidden, weight, 3, norm)
    _check(lens_topk(hidden.to(device), weight.to(device), 3, norm=norm, backend=backend), want, backend)


def test_bfloat16_and_leading_dims(backend, device):
    """bf16 inputs, and (layer, token, d) rows giving (layer, token, k)."""
    hidden, weight = _inputs(3 * 11, 32, 200, torch.bfloat16, seed=3)
    want_values, want_ids = reference.lens_topk(hidden, weight, 4)
    values, ids = lens_topk(hidden.reshape(3, 11, 32).to(device), weight.to(device), 4, backend=backend)
    assert ids.shape == (3, 11, 4) and values.shape == (3, 11, 4)
    _check((values.reshape(-1, 4), ids.reshape(-1, 4)), (want_values, want_ids), backend)


def test_ties_go_to_the_smaller_id(backend, device):
    """Duplicate unembedding rows and small-integer data (every logit exact in any order): equal
    values rank by id, also across tiles and at the k-th place; -0.0 ties with +0.0."""
    g = torch.Generator().manual_seed(4)
    weight = torch.randint(-3, 4, (2200, 24), generator=g).float()
    weight[[5, 1030, 1500, 2100]] = 3.0  # four equal rows, in three Triton tiles
    weight[600] = weight[200]
    hidden = torch.randint(-2, 3, (5, 24), generator=g).float()
    hidden[1] = 1.0  # row 1's best logit, 72, is shared by ids 5, 1030, 1500, 2100
    hidden[2] = 0  # every logit 0: the top k are ids 0..k-1
    want = reference.lens_topk(hidden, weight, 6)
    assert want[1][1, :4].tolist() == [5, 1030, 1500, 2100]
    assert want[1][2].tolist() == list(range(6))
    got = lens_topk(hidden.to(device), weight.to(device), 6, backend=backend)
    _check(got, want, backend)
    negative_zero = torch.tensor([[-0.0, 1.0]])
    w = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])  # logits -0.0, 0.0, -0.0
    values, ids = lens_topk(negative_zero.to(device), w.to(device), 3, backend=backend)
    assert ids.cpu().tolist() == [[0, 1, 2]] and (values.cpu() == 0).all()


def test_real_hidden_states(tiny_llama, backend, device):
    """Every layer of a tiny Llama through its own final norm and lm_head: the last layer
    (already normed) gives the model's own top logits."""
    hidden = tiny_llama.hidden_states  # (layers + 1, tokens, 64)
    torch.manual_seed(0)
    weight = torch.randn(128, 64)
    norm = LensNorm("rms", 1e-6, torch.rand(64) + 0.5)
    want = reference.lens_topk(hidden[:-1].reshape(-1, 64), weight, 5, norm)
    got = lens_topk(hidden[:-1].to(device), weight.to(device), 5, norm=norm, backend=backend)
    _check((got[0].reshape(-1, 5), got[1].reshape(-1, 5)), want, backend)
    last = hidden[-1]
    logits = last @ weight.T
    _, ids = lens_topk(last.to(device), weight.to(device), 1, backend=backend)
    assert torch.equal(ids.cpu()[:, 0], logits.argmax(1))


def test_triton_vocabulary_splits():
    """The GPU launch splits the vocabulary across programs; the interpreter uses one split
    unless told, so check the merge of several (an uneven last split too) here."""
    hidden, weight = _inputs(21, 48, 1100, torch.float16, seed=5)
    want = reference.lens_topk(hidden, weight, 7)
    for splits in (3, 8):
        _check(gpu.lens_topk(hidden, weight, 7, None, splits=splits), want, "triton")


# ---- the exact CPU path ----------------------------------------------------------------


def _rn32(q: Fraction) -> float:
    """The fp32 nearest to the rational q, ties to even, by exact comparison."""
    f = np.float32(float(q))
    neighbours = [np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))]
    return float(min(neighbours, key=lambda c: (abs(Fraction(float(c)) - q), int(np.array(c).view(np.int32)) & 1)))


def _adversarial() -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 rows and unembedding whose correctly rounded logits an fp32 GEMM can get wrong.
    Each row's construction lives in its own hidden dims, so it decides that row's top k."""
    d, vocab = 40, 64
    w = torch.zeros(vocab, d)
    x = torch.zeros(4, d)
    # row 0: cancellation, 1 + 2^-30 - 1 = 2^-30 exactly (left to right in fp32: 0)
    x[0, :3] = torch.tensor([1.0, 2.0**-30, -1.0])
    w[10, :3] = 1.0  # 2^-30
    w[11, 1] = 0.5  # 2^-31
    # row 1: fp32 midpoints, 1 + 2^-24 rounds to 1 (even); anything above it rounds up
    x[1, 3:6] = 1.0
    w[19, 3:6] = torch.tensor([1.0, 2.0**-24, 2.0**-80])  # fp64 sum is the midpoint; -> 1 + 2^-23
    w[20, 3:6] = torch.tensor([1.0, 0.0, 0.0])  # 1
    w[21, 3:6] = torch.tensor([1.0, 2.0**-24, 0.0])  # 1 + 2^-24 -> 1, ties with id 20
    w[22, 3:6] = torch.tensor([1.0, 2.0**-24 + 2.0**-40, 0.0])  # -> 1 + 2^-23, ties with id 19
    w[23, 3:6] = torch.tensor([1.0 + 2.0**-23, 2.0**-24, 0.0])  # 1 + 3 2^-24 -> 1 + 2^-22 (even)
    # row 2: 40 logits within a few ulps of each other, far inside the int8 screen's error
    g = torch.Generator().manual_seed(6)
    x[2, 8:] = torch.randn(d - 8, generator=g)
    base, direction = x[2] + torch.randn(d, generator=g) / 4, torch.randn(d, generator=g)
    steps = torch.randint(-4, 5, (40, 1), generator=g).float() * 2.0**-22
    w[24:64, 8:] = (base + steps * direction)[:, 8:]
    # row 3: one-ulp neighbours of one unembedding row
    x[3, 8:] = w[24, 8:] + torch.randn(d - 8, generator=g) / 4
    w[30:40] = w[24]
    for j in range(30, 40):
        t = 8 + j - 30
        w[j, t] = float(np.nextafter(np.float32(w[j, t]), np.float32(np.inf if j % 2 else -np.inf)))
    return x, w


def test_reference_is_correctly_rounded():
    """reference.exact_logits equals RN32 of the exact rational dot product, pair by pair."""
    x, w = _adversarial()
    x = torch.cat([x, torch.randn(3, x.shape[1])])
    got = reference.exact_logits(x, w)
    for i in range(x.shape[0]):
        for j in range(w.shape[0]):
            exact = sum(Fraction(float(a)) * Fraction(float(b)) for a, b in zip(x[i], w[j]))
            assert float(got[i, j]) == _rn32(exact), (i, j)
    assert got[1, 21] == 1.0 and got[1, 22] == 1.0 + 2.0**-23 and got[1, 23] == 1.0 + 2.0**-22
    assert got[1, 19] == 1.0 + 2.0**-23 and got[0, 10] == 2.0**-30


def _prepared(weight: torch.Tensor, path: str) -> cpu.Prepared:
    """The unembedding prepared for one screen path; a path this CPU cannot run exactly is skipped
    with the probe's reason (which names the CPU and its missing features)."""
    try:
        return cpu.prepare(weight, gemm=path)
    except BackendUnavailableError as err:
        pytest.skip(str(err))


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a path that passes its probe must be right
@pytest.mark.parametrize("path", screen.PATHS)
@pytest.mark.parametrize("k", [1, 3, 10])
def test_cpu_certificate_on_adversarial_rows(k, path):
    """Exact ids and values where the int8 screen cannot separate the logits, where fp32
    summation cancels, and at exact fp32 midpoints, on every screen path this CPU offers (forced
    by name, with no safety net to hide behind: a warning fails the test); small capacities
    force the fp32 fallback."""
    x, w = _adversarial()
    want_values, want_ids = reference.lens_topk(x, w, k)
    prepared = _prepared(w, path)
    assert prepared.gemm == path and prepared.probes[path] == "passed"
    for cap in (cpu.CAP, k):
        values, ids, stats = cpu.topk(x, prepared, k, cap=cap)
        assert torch.equal(ids, want_ids) and torch.equal(values, want_values)
        assert stats.redone == 0
    assert stats.fallback[2]  # cap k: the near-tie row screens again in fp32
    assert want_ids[0, :3].tolist() == [10, 11, 0][:k]  # 2^-30 > 2^-31 > 0 = the rest, by id
    assert want_ids[1, :5].tolist() == [23, 19, 22, 20, 21][:k]
    assert stats.exact_sums > 0  # the midpoint of id 19 at least went through math.fsum


def test_cpu_auto_path_passed_its_probe():
    """ "auto" screens with the first int8 path whose probe passed on this CPU (or with fp32), and
    says why it passed over the others."""
    _, w = _adversarial()
    prepared = cpu.prepare(w)
    assert prepared.probes[prepared.gemm] == "passed"
    assert prepared.gemm != "int_mm"  # exact, but a reference loop on some CPUs: only by name
    tried = list(prepared.probes)
    assert tried == list(screen.AUTO_ORDER[: len(tried)]) or tried[-1] == "fp32"
    for name in tried[:-1]:
        assert "wrong products" in prepared.probes[name] or "failed" in prepared.probes[name]


def _faulty(weight: torch.Tensor) -> cpu.Prepared:
    """An int8 path whose GEMM gives wrong products, by construction on any CPU: its packed matrix
    is not the one its sentinel rows were checked against (one vocabulary row negated)."""
    prepared = cpu.prepare(weight)
    if prepared.gemm == "fp32":
        pytest.skip(f"no int8 GEMM path runs exactly on this CPU: {prepared.probes}")
    signs, block = cpu.rotation(weight.shape[1])
    codes = torch.empty(weight.shape, dtype=torch.int8)
    scratch = [np.empty(weight.shape[0]) for _ in range(5)]
    cpu._quantize(weight.contiguous().numpy(), signs, block, codes.numpy(), 127, *scratch)
    wrong = codes.clone()
    wrong[2] = -wrong[2]
    return dataclasses.replace(prepared, packed=screen.pack(prepared.path, wrong))


def test_cpu_a_wrong_int8_gemm_is_caught_and_its_rows_redone():
    """A GEMM that returns wrong products (as oneDNN's u8 x s8 op does on AVX2-only CPUs) is
    caught by the sentinel rows of the very call: the block is redone on the fp32 screen, the
    answer is still exact, and one warning names the CPU and the path."""
    hidden, weight = _inputs(30, 64, 700, torch.float32, seed=13)
    bad = _faulty(weight)
    want = reference.lens_topk(hidden, weight, 4)
    cpu._FAULTY.discard(bad.gemm)
    try:
        with pytest.warns(RuntimeWarning, match=rf"path '{bad.gemm}': .*sentinel row .*redone on the fp32") as caught:
            values, ids, stats = cpu.topk(hidden, bad, 4)
        assert torch.equal(ids, want[1]) and torch.equal(values, want[0])
        assert stats.redone == 30 and stats.fallback.all()
        assert screen.cpu_name() in str(caught[0].message)
    finally:
        cpu._FAULTY.discard(bad.gemm)


def test_cpu_a_row_that_fails_its_certificate_is_redone():
    """A screen whose bound is wrong (its scales halved: the products shrink towards 0 and the top
    ids drop below the cut) leaves rows with fewer than k certified ids, the failure that once
    returned uninitialised memory: those rows are redone on the fp32 screen, with a warning."""
    hidden, weight = _inputs(20, 48, 600, torch.float32, seed=14)
    prepared = cpu.prepare(weight)
    if prepared.gemm == "fp32":
        pytest.skip(f"no int8 GEMM path runs exactly on this CPU: {prepared.probes}")
    bad = dataclasses.replace(prepared, sw=prepared.sw / 2, p=prepared.p * 0)
    want = reference.lens_topk(hidden, weight, 3)
    with pytest.warns(RuntimeWarning, match="failed their certificate"):
        values, ids, stats = cpu.topk(hidden, bad, 3)
    assert torch.equal(ids, want[1]) and torch.equal(values, want[0])
    assert stats.redone > 0 and (ids >= 0).all() and (ids < 600).all()


def test_cpu_checks_catch_garbage_rows():
    """`_failing` flags ids outside the vocabulary, values that are not the exact re-scoring of
    their ids, and rows out of the tie rule's order; right rows pass."""
    hidden, weight = _inputs(5, 32, 90, torch.float32, seed=15)
    values, ids = reference.lens_topk(hidden, weight, 3)
    prepared = cpu.prepare(weight, gemm="fp32")
    ids, values = ids.numpy().copy(), values.numpy().copy()
    assert not cpu._failing(hidden, prepared, ids, values).any()
    ids[0, 1] = 2361836109651742017  # as seen on an AMD EPYC: uninitialised memory
    ids[1, 0] = -9223372036854775808
    values[2, 0] = 1.49e9
    ids[3, [0, 1]] = ids[3, [1, 0]]  # order broken
    assert cpu._failing(hidden, prepared, ids, values).tolist() == [True, True, True, True, False]


def test_cpu_flat_and_zero_rows():
    """Random (flat) rows, rows of zeros (every logit ties at 0) and a zero unembedding row."""
    hidden, weight = _inputs(30, 96, 3000, torch.float16, seed=7)
    hidden[4] = 0
    weight[17] = 0
    prepared = cpu.prepare(weight)
    for k in (1, 10):
        want = reference.lens_topk(hidden, weight, k)
        values, ids, stats = cpu.topk(hidden.float(), prepared, k, cap=64)
        assert torch.equal(ids, want[1]) and torch.equal(values, want[0])
        assert ids[4].tolist() == list(range(k))
        assert stats.fallback[4] and stats.candidates[4] == 3000


def test_cpu_fallback_in_blocks():
    """More rows than one fallback block (64) screened again in fp32: each lands in its place."""
    hidden, weight = _inputs(150, 48, 500, torch.float32, seed=11)
    want = reference.lens_topk(hidden, weight, 3)
    values, ids, stats = cpu.topk(hidden, cpu.prepare(weight), 3, cap=3)
    assert stats.fallback.sum() > 64
    assert torch.equal(ids, want[1]) and torch.equal(values, want[0])


def test_cpu_screen_survives_outlier_dims():
    """Hidden states with a few channels 30x the rest (as in LLaMA-family models): the screen
    works in a rotated basis that spreads them out, so the int8 screen alone still certifies
    every row (no fp32 fallback), and exactly."""
    hidden, weight = _inputs(40, 256, 4000, torch.float16, seed=10)
    hidden = hidden.float()
    hidden[:, [3, 77, 130, 200]] *= 30
    want = reference.lens_topk(hidden, weight, 5)
    values, ids, stats = cpu.topk(hidden, cpu.prepare(weight), 5, cap=200)
    assert torch.equal(ids, want[1]) and torch.equal(values, want[0])
    assert not stats.fallback.any() and stats.candidates.mean() < 15  # unrotated: 22 (k = 5)


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("path", screen.PATHS)
def test_cpu_every_screen_path_gives_the_reference(path):
    """Every screen path this CPU runs exactly (forced by name) gives the reference's answer."""
    hidden, weight = _inputs(25, 80, 900, torch.float16, seed=8)
    prepared = _prepared(weight, path)
    want = reference.lens_topk(hidden, weight, 5)
    values, ids, stats = cpu.topk(hidden.float(), prepared, 5)
    assert torch.equal(ids, want[1]) and torch.equal(values, want[0])
    assert stats.redone == 0 and (path == "fp32") == bool(stats.fallback.all())


def test_prepared_unembedding_is_reused(backend, device):
    hidden, weight = _inputs(9, 32, 150, torch.float16, seed=9)
    prepared = prepare_unembedding(weight.to(device))
    first = lens_topk(hidden.to(device), prepared, 2, backend=backend)
    second = lens_topk(hidden.to(device), prepared, 2, backend=backend)
    assert torch.equal(first[1], second[1])
    if backend == "numba":
        assert "numba" in prepared._derived  # built once, kept
    tensor = weight.to(device)
    assert prepare_unembedding(tensor) is prepare_unembedding(tensor)  # the last tensor is remembered
    before = prepare_unembedding(tensor)
    tensor.mul_(2)  # an in-place change bumps the version: wrapped anew
    assert prepare_unembedding(tensor) is not before
    from_numpy = lens_topk(hidden.to(device), weight.numpy(), 2, backend=backend) if device.type == "cpu" else first
    assert torch.equal(from_numpy[1].cpu(), first[1].cpu())


def test_prepared_unembedding_pickles_without_derived_data():
    """A LensUnembedding sent to another process carries the matrix, not its int8 form."""
    hidden, weight = _inputs(6, 32, 120, torch.float16, seed=12)
    prepared = prepare_unembedding(weight)
    want = lens_topk(hidden, prepared, 3, backend="numba")
    copy = pickle.loads(pickle.dumps(prepared))
    assert copy._derived == {} and torch.equal(copy.weight, weight)
    assert torch.equal(lens_topk(hidden, copy, 3, backend="numba")[1], want[1])


def test_input_errors():
    hidden, weight = _inputs(4, 8, 20, torch.float32)
    with pytest.raises(ValueError, match="k must be between 1 and the vocabulary size 20"):
        lens_topk(hidden, weight, 21)
    with pytest.raises(ValueError, match="k must be"):
        lens_topk(hidden, weight, 0)
    with pytest.raises(ValueError, match="features"):
        lens_topk(hidden[:, :7], weight, 2)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        lens_topk(hidden.double(), weight, 2)
    with pytest.raises(ValueError, match="norm.kind"):
        lens_topk(hidden, weight, 2, norm=LensNorm("batch", 1e-5, torch.ones(8)))
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        lens_topk(hidden, weight, 2, norm=LensNorm("rms", 1e-5, torch.ones(9)))
    bad = hidden.clone()
    bad[2, 3] = math.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        lens_topk(bad, weight, 2, backend="numba")
    with pytest.raises(BackendUnavailableError, match="CPU tensors"):
        lens_topk(hidden.to("meta"), weight.to("meta"), 2, backend="numba")
