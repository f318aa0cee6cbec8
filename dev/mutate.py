"""Mutation runner: put realistic one-line bugs into a COPY of the tree, one at a time, and see
whether the tests catch them. Not collected by pytest (it lives outside ``tests/``).

Each mutation names a file, its exact old text (which must occur exactly once), the new text,
what the bug would do, and the tests to run (a pytest selection: files, ``-k`` expressions). The
tree (git's tracked and untracked, not ignored files) is copied once into a temporary folder; each
mutation is applied to that copy, its selection runs with a timeout, and the file is restored.
The worktree itself is never touched.

    python dev/mutate.py                    # every mutation, a table at the end
    python dev/mutate.py --only I8,K3       # some of them
    python dev/mutate.py --list             # the mutations, nothing run
    python dev/mutate.py --check            # does every old text still occur exactly once?
    python dev/mutate.py --baseline         # first run each selection unmutated (must pass)
    python dev/mutate.py --full             # run the whole suite for each mutation (slow)
    python dev/mutate.py --json out.json    # also write the results

Outcomes: ``caught`` (the selection failed), ``caught (setup error)`` (only a fixture failed, e.g.
an extraction refused its own input: caught by a crash, not a comparison), ``MISSED`` (it passed),
``MISSED (no test)`` (no selected test exists in this tree), ``timeout`` (counted as caught: a
hang is visible), ``stale`` (the old text is not in the file once: update the entry),
``error`` (pytest could not run: rc 2-4, e.g. a collection error). Set VISLENS_CACHE and the
interpreter (``--python``) as for the tests; the runner passes PYTHONPATH=<copy>.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    """One realistic bug: ``old`` (exactly once in ``file``) becomes ``new``."""

    id: str
    file: str
    old: str
    new: str
    what: str
    tests: tuple[str, ...]
    note: str = ""


@dataclass
class Outcome:
    id: str
    result: str
    seconds: float
    detail: str = ""
    extra: dict = field(default_factory=dict)


M = Mutation
MUTATIONS: list[Mutation] = [
    # ---- the rows of issue 18 ------------------------------------------------------------------
    M(
        "I1",
        "vislens/kernels/lens_topk/eager.py",
        "block_ids = torch.arange(v0, v0 + logits.shape[1], device=x.device).expand_as(logits)",
        "block_ids = torch.arange(0, logits.shape[1], device=x.device).expand_as(logits)",
        "lens top-k (torch backend, as the old analysis): vocabulary-block offset dropped",
        ("tests/kernels/test_lens_topk_tiles.py", "tests/kernels/test_lens_topk.py"),
    ),
    M(
        "I2",
        "vislens/analyze/logit_lens.py",
        'if np.array_equal(cached["sample"].values, done):',
        "if True:",
        "cached top-k reused without checking it covers the samples now done",
        ("tests/analyze/test_logit_lens.py",),
    ),
    M(
        "I3",
        "vislens/analyze/logit_lens.py",
        'normed = (acts["layer"].values == last) & bool(_normed_last(tree))',
        'normed = (acts["layer"].values == last) & False',
        "final norm applied to the (already normed) last layer too",
        ("tests/analyze/test_logit_lens.py", "tests/extract/test_layernorm_decoder.py"),
    ),
    M(
        "I4",
        "vislens/kernels/lens_topk/reference.py",
        "layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)",
        "layer_norm(x, (x.shape[-1],), norm.weight, None, norm.eps)",
        "lens LayerNorm without its bias",
        ("tests/extract/test_layernorm_decoder.py", "tests/analyze/test_logit_lens.py"),
    ),
    M(
        "I5",
        "vislens/analyze/logit_lens.py",
        "reference_words(texts[i, : counts[i]])",
        "reference_words(texts[i, : counts[i] - 1])",
        "the last reference caption of each image ignored",
        ("tests/analyze/test_logit_lens.py", "tests/analyze/test_words.py"),
    ),
    M(
        "I6",
        "vislens/extract/run.py",
        "rows = torch.tensor([n - 1])",
        "rows = torch.tensor([modality.shape[1] - 1])",
        "norm-attention 'last' query row: the padded batch's last position, not the sample's",
        ("tests/extract/test_padding.py",),
    ),
    M(
        "I7",
        "vislens/extract/prompts.py",
        "return texts & ~np.asarray(special, dtype=bool)",
        "return texts",
        "noisy prompts draw special tokens",
        ("tests/extract/test_prompts.py",),
    ),
    M(
        "I7b",
        "vislens/extract/prompts.py",
        "texts = np.array([bool(t) and REPLACEMENT_CHARACTER not in t for t in vocabulary], dtype=bool)",
        "texts = np.ones(len(vocabulary), dtype=bool)",
        "noisy prompts draw byte pieces that decode to U+FFFD (byte-level vocabularies)",
        ("tests/extract/test_prompts.py",),
    ),
    M(
        "I8",
        "vislens/store/writer.py",
        "return samples[(samples // block) % count == index]",
        "return samples[samples % count == index]",
        "--shard i/n takes samples one by one, not blocks: two processes rewrite one file",
        ("tests/store/test_shard_processes.py",),
    ),
    M(
        "I9a",
        "vislens/store/writer.py",
        "return mine[self.status()[mine] != schema.DONE]",
        "return mine[self.status()[mine] == schema.PENDING]",
        "resume: skipped samples never tried again",
        ("tests/store/test_resume_skipped.py",),
    ),
    M(
        "I9b",
        "vislens/store/writer.py",
        "self.done[index] = schema.SKIPPED",
        "self.done[index] = schema.PENDING",
        "skipped samples recorded as pending",
        ("tests/store/test_resume_skipped.py",),
    ),
    M(
        "I10",
        "vislens/store/ablation.py",
        '        """Write one pair\'s arrays (padded to the group\'s shapes), then its done flag."""\n',
        '        """Write one pair\'s arrays (padded to the group\'s shapes), then its done flag."""\n'
        "        self.done[sample, prompt] = schema.DONE\n",
        "ablation pair's done flag written before its arrays",
        ("tests/ablate/test_crash.py",),
    ),
    M(
        "I11",
        "vislens/analyze/ablation.py",
        'np.nanmean(_done(ds, "loss").mean("sample", skipna=True).values)',
        'np.nanmean(_done(ds, "loss").values)',
        "threshold: mean over all pairs, not samples then prompts",
        ("tests/ablate/test_weights.py", "tests/ablate/test_analysis.py"),
    ),
    # ---- kernels ----------------------------------------------------------------------------------
    M(
        "K1",
        "vislens/kernels/mean_cosine/triton.py",
        "rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)",
        "rows = tl.arange(0, BLOCK_M)",
        "mean_cosine (Triton): every row block reads the first block's rows",
        ("tests/kernels/test_block_edges.py", "tests/kernels/test_mean_cosine.py"),
    ),
    M(
        "K2",
        "vislens/kernels/mean_cosine/triton.py",
        "rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)",
        "rows = tl.arange(0, BLOCK_M)",
        "cosine_profile (Triton): later row blocks never written",
        ("tests/kernels/test_block_edges.py", "tests/kernels/test_mean_cosine.py"),
    ),
    M(
        "K3",
        "vislens/kernels/value_gram/triton.py",
        "n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)",
        "n = tl.arange(0, BLOCK_N)",
        "value_gram (Triton): token blocks past the first not computed",
        ("tests/kernels/test_block_edges.py", "tests/kernels/test_value_gram.py"),
    ),
    M(
        "K4",
        "vislens/kernels/norm_attention/triton.py",
        "q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)",
        "q = tl.arange(0, BLOCK_Q)",
        "norm_attention (Triton): query blocks past the first not computed",
        ("tests/kernels/test_block_edges.py", "tests/kernels/test_norm_attention.py"),
    ),
    M(
        "K5",
        "vislens/kernels/value_gram/numba.py",
        "k1 = min(k0 + _D_SLICE, model_dim)",
        "k1 = min(_D_SLICE, model_dim)",
        "value_gram (numba): model dimensions past the first 256 dropped",
        ("tests/kernels/test_block_edges.py", "tests/kernels/test_value_gram.py"),
    ),
    M(
        "K6",
        "vislens/kernels/value_gram/numba.py",
        "blocks = -(-n_tokens // _BLOCK_TOKENS)",
        "blocks = max(1, n_tokens // _BLOCK_TOKENS)",
        "value_gram (numba): the last partial block of 16 tokens dropped",
        ("tests/kernels/test_block_edges.py", "tests/kernels/test_value_gram.py"),
    ),
    M(
        "K7",
        "vislens/kernels/mean_cosine/numba.py",
        "        for t in range(1, tasks):  # task order: the same for any thread count\n            sums[g] += partial[g, t]",
        "        for t in range(1, 1):\n            sums[g] += partial[g, t]",
        "mean_cosine (numba): only the first task's rows summed",
        ("tests/kernels/test_block_edges.py", "tests/kernels/test_mean_cosine.py"),
    ),
    M(
        "K8",
        "vislens/kernels/value_gram/eager.py",
        "f = (v @ w[:, :, k : k + _D_SLICE]).transpose(1, 2)",
        "f = (v @ w[:, :, :_D_SLICE]).transpose(1, 2)",
        "value_gram (torch): every D slice is the first one",
        ("tests/kernels/test_block_edges.py", "tests/kernels/test_value_gram.py"),
    ),
    M(
        "K9",
        "vislens/kernels/mean_cosine/numba.py",
        "    return torch.from_numpy(_unit_sums(as_numpy(flat), offsets.numpy(), d, ROWS_PER_TASK))",
        "    return torch.from_numpy(_unit_sums(as_numpy(flat), offsets.numpy(), d, "
        "max(16, -(-offsets.numel() // (8 * __import__('numba').get_num_threads())))))",
        "mean_cosine (numba): rows split into tasks by the thread count (the sums' order follows the threads)",
        ("tests/kernels/test_fixed_order.py",),
    ),
    M(
        "K10",
        "vislens/kernels/mean_cosine/numba.py",
        "@njit(cache=True)\ndef _unit_dot(row, u, s):",
        '@njit(cache=True, fastmath={"reassoc", "contract"})\ndef _unit_dot(row, u, s):',
        "cosine_profile (numba): fast-math again (fused multiply-adds where the CPU has them)",
        ("tests/kernels/test_fixed_order.py",),
        note="a CPU with FMA and one without give other bits: caught by the generic-CPU child process",
    ),
    M(
        "K11",
        "vislens/kernels/lens_topk/numba.py",
        "    failed = (n <= cap) & _failing(xs, prep, ids, values)",
        "    failed = (n <= cap) & False",
        "lens_topk (CPU): rows that fail their certificate are returned (uninitialised ids on AMD EPYC once)",
        ("tests/kernels/test_lens_topk.py",),
    ),
    M(
        "K12",
        "vislens/kernels/lens_topk/numba.py",
        "    screen.check(out[rows:], prep.sentinels, path)",
        "    pass",
        "lens_topk (CPU): the sentinel rows of each int8 GEMM call are not checked",
        ("tests/kernels/test_lens_topk.py",),
    ),
    M(
        "K13",
        "vislens/kernels/lens_topk/screen.py",
        'AUTO_ORDER = ("onednn", "onednn7")',
        'AUTO_ORDER = ("int_mm",)',
        "lens_topk (CPU): auto screens with torch._int_mm (exact, but ~14x slower than fp32 on AVX2)",
        ("tests/kernels/test_lens_topk.py",),
        note="caught by test_cpu_auto_path_passed_its_probe: auto never takes int_mm (its cost: bench/lens.py)",
    ),
    M(
        "K14",
        "vislens/kernels/value_gram/__init__.py",
        "    name = resolve(backend, values, w_o)",
        '    name = resolve(backend, values, w_o, cpu_auto="torch")',
        "value_gram: BLAS on the CPU again (a token's Gram follows the batch it came in)",
        ("tests/kernels/test_fixed_order.py",),
    ),
    M(
        "T1",
        "vislens/toys/shapes.py",
        "cells = sorted(int(c) for c in rng.choice(9, size=n, replace=False))",
        "cells = sorted(int(c) for c in rng.choice(9, size=n, replace=True))",
        "shapes world: two shapes may share a grid cell",
        ("tests/toys/test_shapes.py",),
    ),
    M(
        "T2",
        "vislens/toys/evaluate.py",
        "    got = Counter(words(generated))",
        "    got = Counter(set(words(generated)))",
        "toys' caption F1 over word sets, not multisets",
        ("tests/toys/test_evaluate.py",),
    ),
    M(
        "R1",
        "vislens/runtime.py",
        "        return stored if stored is not None else default",
        "        return default",
        "a resume ignores the store's recorded batch size and threads",
        ("tests/extract/test_batches.py",),
    ),
    # ---- store ------------------------------------------------------------------------------------
    M(
        "S1",
        "vislens/store/layers.py",
        '"<QQ", _checked(index, path, "shard index"), 16 * self.layer',
        '"<QQ", _checked(index, path, "shard index"), 8 * self.layer',
        "read_layer: shard index entries taken as 8 bytes (wrong layer read)",
        ("tests/store/test_read_layer.py",),
    ),
    M(
        "S2",
        "vislens/store/writer.py",
        "pad_value = 0 if value.dtype == np.float16 else fill",
        "pad_value = fill",
        "hidden states padded with NaN instead of 0",
        ("tests/extract/test_padding.py", "tests/store/test_format.py"),
    ),
    M(
        "S3",
        "vislens/store/precision.py",
        "half = (1 << (drop - 1)) - 1",
        "half = 1 << (drop - 1)",
        "--keep-bits rounds half up instead of half to even",
        ("tests/store/test_precision.py",),
    ),
    M(
        "S4",
        "vislens/store/shards.py",
        "index[:, 0] = np.cumsum(lengths) - lengths",
        "index[:, 0] = np.cumsum(lengths)",
        "whole-shard writer: chunk offsets shifted by one chunk",
        ("tests/store/test_shards.py",),
    ),
    M(
        "S5",
        "vislens/store/ablation.py",
        "np.argwhere((self.status() != schema.DONE) & mine[:, None])",
        "np.argwhere((self.status() == schema.PENDING) & mine[:, None])",
        "ablation resume: skipped pairs never tried again",
        ("tests/ablate/test_crash.py", "tests/ablate/test_run.py"),
    ),
    M(
        "S6",
        "vislens/store/inspect.py",
        '"pending": int((done == schema.PENDING).sum()),',
        '"pending": int((done != schema.DONE).sum()),',
        "vislens info counts skipped samples as pending too",
        ("tests/store/test_inspect.py", "tests/store/test_resume_skipped.py"),
    ),
    # ---- extract ----------------------------------------------------------------------------------
    M(
        "E1",
        "vislens/extract/run.py",
        "        batches[-1].append(sample)\n    return [b for b in batches if pending.intersection(b)]",
        "        batches[-1].append(sample)\n    return [b for b in batches if pending.intersection(b) and len(b) == size]",
        "extraction drops the last partial batch of each block",
        ("tests/extract/test_padding.py",),
    ),
    M(
        "E2",
        "vislens/extract/plan.py",
        "return max(max(s.n_tokens - s.n_image_tokens for s in samples), 1)",
        "return max(min(s.n_tokens - s.n_image_tokens for s in samples), 1)",
        "text query capacity of the shortest sample: longer samples lose text query rows",
        ("tests/extract/test_padding.py", "tests/analyze/test_norm_attention.py"),
    ),
    M(
        "E3",
        "vislens/extract/adapters/base.py",
        "key = (text,) if self.fixed_image_tokens else (text, image_size)",
        "key = (text,)",
        "token-count cache not keyed by image size: stale counts for variable-size families",
        ("tests/extract/test_families.py::test_hidden_states_and_image_positions_equal_the_models_own",),
    ),
    M(
        "E6",
        "vislens/extract/adapters/base.py",
        "for marker in {placeholder, GENERIC_PLACEHOLDER}",
        "for marker in {placeholder}",
        "fully formatted prompts split on the family's own placeholder only: the study's prompts 5-9 crash",
        ("tests/extract/test_study_prompts.py",),
    ),
    M(
        "E7",
        "vislens/extract/adapters/base.py",
        "        if all(starts) or not any(starts):\n            return texts",
        "        if True:\n            return texts",
        "a batch mixing templated and chat-templated prompts: the chat-templated ones get a second BOS",
        ("tests/extract/test_study_prompts.py",),
    ),
    M(
        "E4",
        "vislens/extract/adapters/base.py",
        "special_ids = set(tok.all_special_ids)",
        "special_ids = {tok.bos_token_id, tok.eos_token_id}",
        "vocabulary's special mask misses pad/unk/<image>: noisy prompts draw them",
        ("tests/extract/test_prompts.py",),
    ),
    M(
        "E5",
        "vislens/extract/capture.py",
        "values = value.transpose(1, 2).reshape(b, n, kv * d)",
        "values = value.reshape(b, n, kv * d)",
        "captured values reshaped without the head transpose",
        ("tests/extract/test_padding.py", "tests/analyze/test_norm_attention.py"),
    ),
    # ---- analyses ---------------------------------------------------------------------------------
    M(
        "A1",
        "vislens/kernels/sample_stats.py",
        "share = np.ascontiguousarray(shares[:, text_rows]).mean(-1) if text_rows.any() else nan",
        "share = shares.mean(-1) if text_rows.any() else nan",
        "image_share averages image query rows too (attention 'all')",
        ("tests/extract/test_padding.py", "tests/analyze/test_norm_attention.py"),
    ),
    M(
        "A2",
        "vislens/kernels/sample_stats.py",
        "seen = text_rows & (positions > first_image)",
        "seen = positions > first_image",
        "image_share_after_image counts image query rows (attention 'all')",
        ("tests/extract/test_padding.py", "tests/analyze/test_norm_attention.py"),
    ),
    M(
        "A3",
        "vislens/analyze/ablation.py",
        "count.min(axis=0))]",
        "count.max(axis=0))]",
        "masking table: pooled n_samples the most of any prompt, not the fewest",
        ("tests/ablate/test_weights.py", "tests/ablate/test_analysis.py"),
    ),
    M(
        "A4",
        "vislens/analyze/ablation.py",
        'k = float(reached["k"].iloc[0]) if len(reached) else np.nan',
        'k = float(reached["k"].iloc[-1]) if len(reached) else np.nan',
        "tokens for 70% of the reduction: the largest k reaching it, not the smallest",
        ("tests/ablate/test_analysis.py",),
    ),
    M(
        "A5",
        "vislens/analyze/ablation.py",
        'curves = [(ALL, per_prompt.mean("prompt").values, float(full.mean("prompt")))]',
        'curves = [(ALL, _done(ds, "loss").mean(("sample", "prompt")).values, float(full.mean("prompt")))]',
        "pooled reduction curve: mean over all pairs, not over prompts",
        ("tests/ablate/test_weights.py", "tests/ablate/test_analysis.py"),
    ),
    # ---- ablate -----------------------------------------------------------------------------------
    M(
        "B1",
        "vislens/ablate/settings.py",
        "fits = self.start <= n_image",
        "fits = self.start < n_image",
        "truncation to k = n (every image token) left out as not fitting",
        ("tests/ablate/test_run.py",),
    ),
    M(
        "B2",
        "vislens/ablate/engine.py",
        "cached = int(kept.max())",
        "cached = int(kept.min())",
        "shared prefix cut to the shortest kept prefix of a batch",
        ("tests/ablate/test_engine.py",),
    ),
    M(
        "B3",
        "vislens/ablate/run.py",
        '"full_loss": np.float32(token_loss[-1].mean()),',
        '"full_loss": np.float32(token_loss[0].mean()),',
        "full_loss taken from the first setting's row",
        ("tests/ablate/test_run.py",),
    ),
    M(
        "B4",
        "vislens/ablate/run.py",
        "if key not in prefixes or not torch.equal(prefixes[key][0], embeds):",
        "if key not in prefixes:",
        "prefix cache keyed by token ids only: InstructBLIP prompts share image features",
        ("tests/ablate/test_prefix_cache.py",),
    ),
    M(
        "B5",
        "vislens/ablate/engine.py",
        "before = torch.arange(pair.caption_start, pair.n_tokens, device=device) - 1",
        "before = torch.arange(pair.caption_start, pair.n_tokens, device=device)",
        "caption loss read from the caption token's own position (off by one)",
        ("tests/ablate/test_engine.py",),
    ),
    # the study's definitions (issue 11): each departure must fail a test
    M(
        "F1",
        "vislens/analyze/logit_lens.py",
        "norm=None if done else norm, backend=backend)[1]",
        "norm=None, backend=backend)[1]",
        "logit lens without the final norm on layers 0..L-1",
        ("tests/analyze/test_logit_lens.py",),
    ),
    M(
        "F2",
        "vislens/extract/adapters/base.py",
        "                own.append(schema.ROLE_BOS)",
        "                own.append(schema.ROLE_INSTRUCTION)",
        "BOS counted as an instruction token (cosine over BOS)",
        ("tests/analyze/test_cosine.py",),
    ),
    M(
        "F3",
        "vislens/analyze/cosine.py",
        "        return roles_or_modality == ROLE_INSTRUCTION",
        "        return roles_or_modality >= ROLE_INSTRUCTION",
        "instruction cosine over template and BOS tokens too",
        ("tests/analyze/test_cosine.py",),
    ),
    M(
        "F4",
        "vislens/analyze/words.py",
        "    tokens_with_word = has_word.any(-1).sum(-1)",
        "    tokens_with_word = np.full(ids.shape[0], ids.shape[1])",
        "token precision over every image token, not those that decoded to a word",
        ("tests/analyze/test_words.py",),
    ),
    M(
        "F5",
        "vislens/analyze/words.py",
        "        out[layer, 0] = hits / distinct.size if distinct.size else 0.0",
        "        out[layer, 0] = hits / max(1, has_word[layer].any(-1).sum())",
        "precision over image tokens, not over distinct decoded words",
        ("tests/analyze/test_words.py",),
    ),
    M(
        "F6",
        "vislens/analyze/words.py",
        '_WORD = re.compile(r"[^\\W_]+")',
        '_WORD = re.compile(r"[^\\W\\d_]+")',
        "words are runs of letters only: digits dropped from captions and decoded tokens ('2 dogs' loses '2')",
        ("tests/analyze/test_words.py",),
    ),
    M(
        "F7",
        "vislens/analyze/logit_lens.py",
        'None if lens["norm_bias"] is None else torch.from_numpy(lens["norm_bias"]),',
        "None,",
        "logit lens: the final LayerNorm's bias dropped (tests/analyze, not only the extraction's test)",
        ("tests/analyze/test_logit_lens.py",),
    ),
    M(
        "F8",
        "vislens/kernels/lens_topk/reference.py",
        'scale = norm.weight + 1.0 if norm.kind == "rms_offset" else norm.weight',
        "scale = norm.weight",
        "logit lens: Gemma's (1 + w) final norm taken as RMSNorm's w",
        ("tests/analyze/test_logit_lens.py",),
    ),
]


def tree_files(root: Path) -> list[str]:
    """Tracked and untracked, not ignored files of the worktree (what a commit could hold)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout
    return [p for p in out.decode().split("\0") if p and (root / p).is_file()]


def copy_tree(root: Path, target: Path) -> None:
    for rel in tree_files(root):
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, dest)


def run_selection(copy: Path, tests: tuple[str, ...], timeout: float, python: str) -> tuple[int | None, float, str]:
    """(return code or None on timeout, seconds, last lines of output); selected files that this
    tree lacks are left out (to measure an older tree's tests with today's list)."""
    tests = tuple(t for t in tests if (copy / t.split("::")[0]).exists() or t.startswith("-"))
    if not any(not t.startswith("-") for t in tests):
        return 5, 0.0, "none of the selected test files exist in this tree"
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    env.setdefault("VISLENS_CACHE", str(copy / ".vislens-cache"))
    command = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--timeout", str(int(timeout)), *tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout + 30)
    except subprocess.TimeoutExpired:
        return None, time.monotonic() - start, "timeout"
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    return proc.returncode, time.monotonic() - start, " | ".join(lines[-2:])[-300:]


def check(copy: Path, mutations: list[Mutation]) -> dict[str, int]:
    return {m.id: (copy / m.file).read_text().count(m.old) for m in mutations}


def run_one(copy: Path, m: Mutation, timeout: float, python: str, full: bool) -> Outcome:
    path = copy / m.file
    original = path.read_text()
    found = original.count(m.old)
    if found != 1:
        return Outcome(m.id, "stale", 0.0, f"old text found {found} times")
    try:
        path.write_text(original.replace(m.old, m.new))
        rc, seconds, tail = run_selection(copy, ("tests",) if full else m.tests, timeout, python)
    finally:
        path.write_text(original)
    if rc is None:
        return Outcome(m.id, "timeout", seconds, tail)
    result = {0: "MISSED", 1: "caught", 5: "MISSED (no test)"}.get(rc, f"error (rc {rc})")
    if rc == 1 and " error" in tail and " failed" not in tail:
        result = "caught (setup error)"  # a fixture crashed (e.g. an extraction refused), no comparison ran
    return Outcome(m.id, result, seconds, tail)


def table(mutations: list[Mutation], outcomes: dict[str, Outcome]) -> str:
    rows = ["| id | result | s | file | the bug | note |", "|---|---|---|---|---|---|"]
    for m in mutations:
        o = outcomes.get(m.id)
        if o is None:
            continue
        where = m.file.removeprefix("vislens/")
        rows.append(f"| {m.id} | {o.result} | {o.seconds:.0f} | {where} | {m.what} | {m.note} |")
    caught = sum(o.result.startswith("caught") or o.result == "timeout" for o in outcomes.values())
    rows.append(f"\n{caught} of {len(outcomes)} caught")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated mutation ids")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--check", action="store_true", help="check that every old text occurs once, and exit")
    parser.add_argument("--baseline", action="store_true", help="run each selection unmutated first")
    parser.add_argument("--full", action="store_true", help="run the whole test suite for each mutation")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per test run")
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs pytest")
    parser.add_argument("--json", help="write the outcomes to this file")
    args = parser.parse_args(argv)

    chosen = MUTATIONS
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {m.id for m in MUTATIONS})
        if unknown:
            parser.error(f"unknown mutation ids {unknown}")
        chosen = [m for m in MUTATIONS if m.id in wanted]
    if args.list:
        for m in chosen:
            note = f"\n     note: {m.note}" if m.note else ""
            print(f"{m.id:4} {m.file}: {m.what}\n     tests: {' '.join(m.tests)}{note}")
        return 0

    with tempfile.TemporaryDirectory(prefix="vislens-mutate-") as tmp:
        copy = Path(tmp) / "tree"
        copy_tree(ROOT, copy)
        if args.check:
            counts = check(copy, chosen)
            bad = {k: v for k, v in counts.items() if v != 1}
            print("every old text occurs exactly once" if not bad else f"stale mutations (id: count): {bad}")
            return 1 if bad else 0
        if args.baseline:
            selections = [("tests",)] if args.full else list(dict.fromkeys(m.tests for m in chosen))
            for tests in selections:
                rc, seconds, tail = run_selection(copy, tests, args.timeout, args.python)
                print(f"baseline {' '.join(tests)}: rc {rc} in {seconds:.0f} s {'' if rc == 0 else tail}", flush=True)
                if rc != 0:
                    print("a selection fails without any mutation: fix that first", file=sys.stderr)
                    return 2
        outcomes: dict[str, Outcome] = {}
        for m in chosen:
            outcome = run_one(copy, m, args.timeout, args.python, args.full)
            outcomes[m.id] = outcome
            print(f"{m.id:4} {outcome.result:8} {outcome.seconds:5.0f} s  {m.what}", flush=True)
    print()
    print(table(chosen, outcomes))
    if args.json:
        Path(args.json).write_text(
            json.dumps([asdict(outcomes[m.id]) | {"mutation": asdict(m)} for m in chosen], indent=1)
        )
    return 1 if any(o.result == "MISSED" for o in outcomes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
