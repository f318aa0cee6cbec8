"""Fill a pre-allocated store sample by sample: resumable, idempotent, shard-parallel.

A sample's arrays are written before its ``done`` flag, so a crash at any moment leaves
either a finished sample or one that a rerun computes again. Writers of ``--shard i/n``
own whole blocks of samples, so they never write the same file.
"""

from __future__ import annotations

import errno
import functools
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import cpu
from zarr.core.sync import sync

from vislens.errors import DiskFullError, StoreExistsError, StoreFormatError, StoreMismatchError
from vislens.store import schema
from vislens.store.create import STATUS_CREATING, STATUS_READY, StoreSpec, create_store
from vislens.store.location import StoreLocation
from vislens.store.precision import keep_mantissa_bits
from vislens.store.shards import encode_sample_shard, is_sample_shard_layout, sample_shard_key

FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def shard_blocks(n_samples: int, block: int, shard: tuple[int, int]) -> np.ndarray:
    """Sample indices owned by shard ``(i, n)``: blocks i, i + n, i + 2n, ..."""
    index, count = shard
    if not (count >= 1 and 0 <= index < count):
        raise ValueError(f"shard must be i/n with 0 <= i < n, got {index}/{count}")
    samples = np.arange(n_samples)
    return samples[(samples // block) % count == index]


SAMPLE_FILES = schema.SAMPLE_FILES
"""Arrays with one file (shard) per sample: writes of different samples never touch one file."""


@functools.cache
def _encoders() -> ThreadPoolExecutor:
    """The threads that compress the layers of whole-shard writes (shared by every writer)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return ThreadPoolExecutor(max_workers=usable or 2, thread_name_prefix="vislens-blosc")


class StoreWriter:
    """Writes samples into an existing, ready store."""

    def __init__(self, location: StoreLocation) -> None:
        self.location = location
        self.root = zarr.open_group(
            location.zarr_store(read_only=False), mode="r+", zarr_format=3, use_consolidated=False
        )
        self.arrays: dict[str, Any] = {}
        groups = [g for g in ("activations", "attention", "captures") if g in self.root]
        groups += [g for g in schema.STAT_GROUPS.values() if g in self.root]
        for group in groups:
            for name, array in self.root[group].arrays():
                if group.startswith("results/") and not array.attrs.get("written_at_extraction"):
                    continue
                # samples are written whole: skip zarr's costly "is this chunk all fill?" scan
                self.arrays[name] = array.with_config({"write_empty_chunks": True})
        self.done = self.arrays["done"]
        self.block = int(self.root.attrs.get("vislens_block", 64))
        self.keep_bits = self.root.attrs.get("keep_bits")
        captured = set(dict(self.root["captures"].arrays())) if "captures" in self.root else set()
        self.big = frozenset((SAMPLE_FILES | captured) & self.arrays.keys())
        """Arrays with one file per sample (written concurrently by `PipelinedWriter`)."""
        self.whole_shards = {name for name in self.big if is_sample_shard_layout(self.arrays[name])}

    @property
    def n_samples(self) -> int:
        """Samples in the store."""
        return int(self.done.shape[0])

    def status(self) -> np.ndarray:
        """The ``done`` flag of every sample (0 pending, 1 done, 2 skipped)."""
        return np.asarray(self.done[:])

    def pending(self, shard: tuple[int, int] = (0, 1)) -> np.ndarray:
        """Samples of this shard not yet done (skipped ones are tried again)."""
        mine = shard_blocks(self.n_samples, self.block, shard)
        return mine[self.status()[mine] != schema.DONE]

    def write_sample(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        """Write one sample's arrays (padded to the store's shapes), then its done flag.

        Raises
        ------
        DiskFullError
            When the disk fills; samples already marked done are intact.
        """
        self.write_arrays(index, arrays)
        self.mark_done(index)

    def write_arrays(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        """Write some of one sample's arrays (its done flag is left alone)."""
        index = self._checked(index)
        with _disk_full_guard(self.location, index):
            for name, value in arrays.items():
                target = self.arrays[name]
                value = np.asarray(value)  # a device copy in flight is waited for here, on the writer's thread
                if name == "hidden" and self.keep_bits is not None:
                    value = keep_mantissa_bits(value, int(self.keep_bits))
                value = _pad(np.asarray(value), target.shape[1:], target.fill_value, name)
                if name in self.whole_shards:  # the same bytes as zarr writes, ~2.5x faster
                    shard = encode_sample_shard(target, value, _encoders())
                    sync(target.store_path.store.set(sample_shard_key(target, index), cpu.Buffer.from_bytes(shard)))
                else:
                    target[index] = value

    def _checked(self, index: int) -> int:
        if not -self.n_samples <= index < self.n_samples:
            raise IndexError(f"sample {index} is outside the store's {self.n_samples} samples")
        return int(index) % self.n_samples

    def mark_done(self, index: int) -> None:
        """Flag a sample finished; call only once all its arrays are written."""
        with _disk_full_guard(self.location, index):
            self.done[index] = schema.DONE

    def mark_skipped(self, index: int) -> None:
        """Flag a sample whose input could not be read."""
        with _disk_full_guard(self.location, index):
            self.done[index] = schema.SKIPPED


class PipelinedWriter:
    """Writes samples on background threads, in the order of a crash-safe store.

    The one-file-per-sample arrays of consecutive samples are compressed and written on
    ``workers`` threads at once (Blosc and the disk release the GIL); the small arrays, whose
    files hold blocks of samples, and the ``done`` flag are written on one thread, in order, each
    only after that sample's big arrays are on disk. At most ``depth`` samples wait in memory.
    """

    def __init__(self, writer: StoreWriter, *, workers: int | None = None, depth: int = 3) -> None:
        if workers is None:  # one per usable core (at least 2, at most 8): the model's next batch never waits
            usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
            workers = max(2, min(8, usable))
        self.writer, self.depth = writer, depth
        self.big = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vislens-write")
        self.ordered = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vislens-done")
        self.pending: list[Future] = []

    def write_sample(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        """Queue a sample (blocks while ``depth`` samples are already waiting)."""
        big = self.big.submit(
            self.writer.write_arrays, index, {k: v for k, v in arrays.items() if k in self.writer.big}
        )
        small = {k: v for k, v in arrays.items() if k not in self.writer.big}

        def finish() -> None:
            big.result()
            self.writer.write_arrays(index, small)
            self.writer.mark_done(index)

        self._queue(self.ordered.submit(finish))

    def mark_skipped(self, index: int) -> None:
        """Queue a skipped flag (in order with the done flags)."""
        self._queue(self.ordered.submit(self.writer.mark_skipped, index))

    def _queue(self, future: Future) -> None:
        self.pending.append(future)
        while len(self.pending) > self.depth:
            self.pending.pop(0).result()

    def close(self, *, quiet: bool = False) -> None:
        """Wait for every queued write; ``quiet`` drops their errors (one is already being raised)."""
        try:
            for future in self.pending:
                if quiet:
                    future.exception()
                else:
                    future.result()
        finally:
            self.big.shutdown(wait=True)
            self.ordered.shutdown(wait=True)


def _pad(value: np.ndarray, shape: tuple[int, ...], fill: Any, name: str) -> np.ndarray:
    if value.shape == shape:
        return value
    if value.ndim != len(shape) or any(v > s for v, s in zip(value.shape, shape)):
        raise StoreFormatError(f"{name}: sample of shape {value.shape} does not fit the store's {shape}")
    pad_value = 0 if value.dtype == np.float16 else fill  # states (hidden, captures) are padded with 0
    out = np.full(shape, pad_value, dtype=value.dtype)
    out[tuple(slice(0, n) for n in value.shape)] = value
    return out


class _disk_full_guard:
    def __init__(self, location: StoreLocation, index: int) -> None:
        self.location, self.index = location, index

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        if isinstance(exc, OSError) and exc.errno in FULL_DISK_ERRNOS:
            raise DiskFullError(
                exc.errno,
                f"no space left while writing sample {self.index} to {self.location.url}. Samples "
                "already marked done are intact; free space and rerun the same command to resume.",
            ) from exc
        return False


def read_root(location: StoreLocation) -> dict[str, Any] | None:
    """The root group's attributes, or None if there is no zarr group."""
    doc = location.read_json("zarr.json")
    if doc is None:
        return None
    return doc.get("attributes", {})


def existing_root(location: StoreLocation) -> dict[str, Any] | None:
    """Root attributes of the vislens store a writer is pointed at, or None if the path is empty.

    Raises
    ------
    StoreExistsError
        When the path holds something that is not a vislens store (nothing is changed).
    StoreFormatError
        When it is a vislens store of another format version.
    """
    attrs = read_root(location)
    if attrs is None and not location.is_empty():
        raise StoreExistsError(
            f"{location.url} already holds files that are not a vislens store; "
            "choose an empty or new --out path (nothing was changed)"
        )
    if attrs is not None and "vislens_format_version" not in attrs:
        raise StoreExistsError(
            f"{location.url} holds a zarr store that is not a vislens store; "
            "choose another --out path (nothing was changed)"
        )
    if attrs is not None and attrs.get("vislens_format_version") != schema.FORMAT_VERSION:
        raise StoreFormatError(
            f"{location.url} has vislens store format version {attrs.get('vislens_format_version')}, "
            f"this vislens writes version {schema.FORMAT_VERSION}; choose another --out (nothing was changed)"
        )
    return attrs


def prepare_store(
    location: StoreLocation,
    spec: StoreSpec,
    *,
    overwrite: bool = False,
    creator: bool = True,
    wait_s: float = 600.0,
) -> StoreWriter:
    """Create the store, or reopen it to resume the same extraction.

    ``creator`` is False for shard writers other than shard 0: they wait for the store
    to become ready instead of creating it.

    Raises
    ------
    StoreExistsError
        When the path holds something that is not a vislens store.
    StoreFormatError
        When it is a vislens store of another format version.
    StoreMismatchError
        When the store was made by a different extraction (and ``overwrite`` is False).
    """
    attrs = existing_root(location)
    if attrs is not None and attrs.get("vislens_status") == STATUS_READY:
        if attrs.get("vislens_fingerprint") == spec.fingerprint:
            return StoreWriter(location)
        if not overwrite:
            raise StoreMismatchError(
                f"{location.url} holds an extraction with different arguments ({_differences(attrs, spec)}); "
                "rerun with the original arguments to resume, pick another --out, or pass --overwrite to replace it"
            )
        if not creator:
            return _wait_ready(location, spec, wait_s)
    elif attrs is not None and not creator:  # being created by shard 0
        return _wait_ready(location, spec, wait_s)
    if not creator and attrs is None:
        return _wait_ready(location, spec, wait_s)
    location.remove()  # empty, half-created (status "creating") or --overwrite
    create_store(location, spec)
    return StoreWriter(location)


def _differences(stored: dict[str, Any], spec: StoreSpec) -> str:
    """The content arguments that differ between a stored extraction and a new one, old and new value."""
    old = (stored.get("extraction") or {}).get("args") or {}
    new = (spec.attrs.get("extraction") or {}).get("args") or {}
    changed = [
        f"{key}: stored {old.get(key)!r}, now {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]
    if not changed:
        return "same options, but the planned samples differ: the data set, its images or the prompts file changed"
    return "; ".join(changed)


def _wait_ready(location: StoreLocation, spec: StoreSpec, wait_s: float) -> StoreWriter:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        location.fs.invalidate_cache()
        attrs = read_root(location)
        if attrs and attrs.get("vislens_status") == STATUS_READY:
            if attrs.get("vislens_fingerprint") != spec.fingerprint:
                raise StoreMismatchError(
                    f"{location.url} was created by shard 0 for a different extraction; "
                    "run every shard with the same arguments"
                )
            return StoreWriter(location)
        time.sleep(0.5)
    raise TimeoutError(
        f"{location.url} was not created within {wait_s:.0f} s; shard 0 creates the store, so start it first"
    )


__all__ = [
    "PipelinedWriter",
    "StoreWriter",
    "existing_root",
    "prepare_store",
    "read_root",
    "shard_blocks",
    "STATUS_CREATING",
]
