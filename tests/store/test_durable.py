"""Local stores make every write durable: the file (before its rename), its folder, and new
folders above it."""

from __future__ import annotations

import asyncio
import os

from zarr.core.buffer import default_buffer_prototype

from vislens.store.location import DurableLocalStore


def _record_fsyncs(monkeypatch) -> list[str]:
    """Every path os.fsync is called on (the real fsync still runs)."""
    seen, real = [], os.fsync

    def fsync(fd):
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def _set(store, key, data: bytes) -> None:
    asyncio.run(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def test_new_folders_are_made_durable_once(tmp_path, monkeypatch):
    root = tmp_path / "s.zarr"
    root.mkdir()
    store = DurableLocalStore(str(root))
    seen = _record_fsyncs(monkeypatch)
    _set(store, "activations/hidden/c/0/0", b"one")
    assert (root / "activations/hidden/c/0/0").read_bytes() == b"one"
    assert seen[0].startswith(str(root / "activations/hidden/c/0/0.")) and seen[0].endswith(".partial")
    seen[0] = str(root / "activations/hidden/c/0/0")  # the temporary file, flushed before its rename
    expected = [root / "activations/hidden/c/0/0", root / "activations/hidden/c/0"]
    expected += [root / "activations/hidden/c", root / "activations/hidden", root / "activations", root, tmp_path]
    assert seen == [str(p) for p in expected]

    seen.clear()
    _set(store, "activations/hidden/c/0/1", b"two")  # its folders are already durable
    assert seen[1:] == [str(root / "activations/hidden/c/0")]
    assert sorted(p.name for p in (root / "activations/hidden/c/0").iterdir()) == ["0", "1"]  # no temporaries


def test_exclusive_write_keeps_the_first(tmp_path):
    store = DurableLocalStore(str(tmp_path))
    _set(store, "zarr.json", b"first")
    asyncio.run(store.set_if_not_exists("zarr.json", default_buffer_prototype().buffer.from_bytes(b"second")))
    assert (tmp_path / "zarr.json").read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["zarr.json"]


def test_synchronous_writes_are_durable_too(tmp_path, monkeypatch):
    store = DurableLocalStore(str(tmp_path / "s.zarr"))
    seen = _record_fsyncs(monkeypatch)
    store.set_sync("g/zarr.json", default_buffer_prototype().buffer.from_bytes(b"{}"))
    assert (tmp_path / "s.zarr/g/zarr.json").read_bytes() == b"{}"
    assert seen[0].endswith(".partial") and seen[1:] == [str(tmp_path / p) for p in ("s.zarr/g", "s.zarr")] + [
        str(tmp_path)
    ]


def test_a_deleted_folder_is_made_durable_again(tmp_path, monkeypatch):
    store = DurableLocalStore(str(tmp_path))
    _set(store, "a/b/x", b"1")
    asyncio.run(store.delete_dir("a"))
    seen = _record_fsyncs(monkeypatch)
    _set(store, "a/b/x", b"2")
    assert str(tmp_path / "a") in seen  # the new folder b's entry in a, and a's in the root
    assert str(tmp_path) in seen
