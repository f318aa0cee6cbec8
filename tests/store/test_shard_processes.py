"""``--shard i/n``: real processes writing one store at the same time never write the same file.

Two ``vislens extract --shard i/2 --block 2`` processes run together (each waits at a barrier
before its first sample, so their writes overlap). Each logs every file it writes into the store
(tests/store/shard_process.py). Checked deterministically, not by the luck of a race: every file
of a per-sample array that a shard writes holds only samples of its own blocks, so no file is
written by both (two writers rewriting one file lose each other's samples); then the store equals
one written by a single process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.store.conftest import extract_config
from tests.store.test_resume import assert_same_store
from vislens.extract import extract
from vislens.store import DONE, open_store
from vislens.store.writer import SAMPLE_FILES, shard_blocks

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 2
PER_SAMPLE = {"hidden", "token_id", "modality", "n_tokens", "image_grid", "attn", "value_gram", "query_pos", "done"}


def _command(model, data, out, shard: int) -> list[str]:
    return [
        "extract",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--prompts",
        "normal,empty",
        "--attention",
        "text",
        "--batch-size",
        "3",
        "--block",
        str(BLOCK),
        "--shard",
        f"{shard}/2",
        "--no-progress",
    ]


def _chunk_files(log: Path, store: Path) -> dict[str, set[str]]:
    """Per-sample array name -> the chunk files (paths relative to the array) this process wrote."""
    out: dict[str, set[str]] = {}
    for line in log.read_text().splitlines():
        relative = Path(line).relative_to(store).as_posix()
        parts = relative.split("/")
        if len(parts) > 3 and parts[2] == "c" and parts[1] in PER_SAMPLE:
            out.setdefault(parts[1], set()).add("/".join(parts[3:]))
    return out


def test_two_shard_processes_never_write_the_same_file(toy_models, manifest, tmp_path):
    store = tmp_path / "sharded.zarr"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    logs = [tmp_path / f"shard{i}.log" for i in (0, 1)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.store.shard_process", str(logs[i]), str(barrier), "2", "--"]
            + _command(toy_models["gqa"], manifest, store, i),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (1, 0)  # the non-creator starts first and waits for the store
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert all("6 samples written" in out for out, _ in outputs), outputs

    written = [_chunk_files(log, store.resolve()) for log in logs]
    assert set(written[0]) == set(written[1]) == PER_SAMPLE  # both wrote every per-sample array
    for name in PER_SAMPLE:
        for shard in (0, 1):
            for chunk in written[shard][name]:
                first = int(chunk.split("/")[0])  # the sample (one file per sample) or the block of samples
                block = first // BLOCK if name in SAMPLE_FILES else first
                assert block % 2 == shard, f"shard {shard} wrote {name}/c/{chunk}, a file of block {block}"
        both = written[0][name] & written[1][name]
        assert not both, f"{name}: files {sorted(both)} written by both shard processes"

    done = open_store(str(store))["activations"]["done"].values
    assert (done == DONE).all()
    single = tmp_path / "single.zarr"
    extract(extract_config(toy_models["gqa"], manifest, str(single), block=BLOCK))
    assert_same_store(store, single)
    assert np.array_equal(open_store(str(single))["activations"]["done"].values, done)


@pytest.mark.parametrize(("n", "block", "count"), [(12, 5, 2), (13, 4, 3), (3, 64, 2), (130, 64, 4), (7, 1, 3)])
def test_shards_own_whole_blocks_and_together_every_sample(n, block, count):
    """Sizes with a partial last block, more shards than blocks, blocks of one sample."""
    owned = [shard_blocks(n, block, (i, count)) for i in range(count)]
    np.testing.assert_array_equal(np.sort(np.concatenate(owned)), np.arange(n))
    for i, samples in enumerate(owned):
        blocks = np.unique(samples // block)
        assert (blocks % count == i).all()
        for b in blocks:  # every sample of each block it touches
            np.testing.assert_array_equal(samples[samples // block == b], np.arange(b * block, min(n, (b + 1) * block)))
    with pytest.raises(ValueError, match="shard must be i/n"):
        shard_blocks(n, block, (count, count))
