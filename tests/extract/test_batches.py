"""How an extraction forms its batches and threads: as the first run did, on every resume or shard."""

from __future__ import annotations

import logging

import numpy as np

from vislens import runtime
from vislens.extract.config import ExtractConfig
from vislens.extract.run import _pinned, plan_batches
from vislens.store.writer import shard_blocks


def test_batches_start_at_every_block_and_a_resume_reruns_a_cut_batch_whole():
    everything = plan_batches(np.arange(10), set(range(10)), block=4, size=3)
    assert everything == [[0, 1, 2], [3], [4, 5, 6], [7], [8, 9]]
    resumed = plan_batches(np.arange(10), {5, 6, 7, 9}, block=4, size=3)
    assert resumed == [[4, 5, 6], [7], [8, 9]]  # sample 4 is done but runs again: its batch stays whole


def test_sharded_writers_form_the_batches_of_a_single_writer():
    single = plan_batches(np.arange(23), set(range(23)), block=5, size=2)
    for count in (2, 3):
        sharded = []
        for index in range(count):
            owned = shard_blocks(23, 5, (index, count))
            sharded += plan_batches(owned, set(owned.tolist()), block=5, size=2)
        assert sorted(sharded) == sorted(single)


def test_a_resume_takes_the_stores_batch_size_and_threads(caplog):
    before = runtime.current()
    config = ExtractConfig(model="m", data="d", out="o")
    try:
        pinned = _pinned(config, {"batch_size": 3, "threads": {"torch": 1, "numba": 1}})
        assert (pinned.batch_size, pinned.threads) == (3, 1)
        assert runtime.current().torch == 1
        fresh = _pinned(config, {})
        assert (fresh.batch_size, fresh.threads) == (4, runtime.usable_cores())
        with caplog.at_level(logging.WARNING, logger="vislens"):
            asked = _pinned(
                ExtractConfig(model="m", data="d", out="o", batch_size=2, threads=2),
                {"batch_size": 3, "threads": {"torch": 1}},
            )
        assert (asked.batch_size, asked.threads) == (2, 2)
        assert "written in batches of 3" in caplog.text and "written with torch threads: 1" in caplog.text
    finally:
        runtime.apply_threads(before.torch)
