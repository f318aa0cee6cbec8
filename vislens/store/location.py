"""Where a store lives: a local folder or any fsspec URL (file://, memory://, s3://, https://).

This is the narrow I/O layer: it hands out a zarr store object and reads raw metadata
documents; it knows nothing about models or analyses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import posixpath
import uuid
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from zarr.core.buffer import Buffer
from zarr.storage import LocalStore

from vislens.errors import StoreFormatError

LOCAL_PROTOCOLS = ("file", "local")


@dataclass(frozen=True)
class StoreLocation:
    """A store's URL (or local path) plus fsspec storage options (e.g. an S3 endpoint)."""

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @cached_property
    def _fs_path(self) -> tuple[Any, str]:
        from fsspec.core import url_to_fs

        scheme = self.url.split("://", 1)[0] if "://" in self.url else ""
        if scheme in ("s3", "s3a"):
            _require("s3fs", "s3:// stores need s3fs: pip install 'vislens[s3]'")
        if scheme in ("http", "https"):
            _require("aiohttp", f"{scheme}:// stores need aiohttp: pip install 'vislens[http]'")
        fs, path = url_to_fs(self.url, **self.storage_options)
        return fs, path.rstrip("/")

    @property
    def fs(self) -> Any:
        """The (synchronous) fsspec filesystem."""
        return self._fs_path[0]

    @property
    def path(self) -> str:
        """The store's root path within the filesystem."""
        return self._fs_path[1]

    @property
    def is_local(self) -> bool:
        """Whether the store is a folder on this machine."""
        protocol = self.fs.protocol
        protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
        return any(p in LOCAL_PROTOCOLS for p in protocols)

    def zarr_store(self, *, read_only: bool) -> Any:
        """A zarr v3 store object on this location.

        Local folders get atomic, durable writes (temporary file, fsync, rename), so data that
        a later write depends on (a sample's arrays before its ``done`` flag) is on disk first.
        """
        from zarr.storage import FsspecStore

        if self.is_local:
            return DurableLocalStore(self.path, read_only=read_only)
        return FsspecStore.from_url(self.url, storage_options=self.storage_options, read_only=read_only)

    def key(self, *parts: str) -> str:
        """Full filesystem path of a key inside the store."""
        return posixpath.join(self.path, *parts)

    def exists(self) -> bool:
        """Whether anything exists at the store's path."""
        try:
            return bool(self.fs.exists(self.path))
        except OSError:
            return False

    def is_empty(self) -> bool:
        """Whether the path is absent or an empty folder."""
        if not self.exists():
            return True
        if not self.fs.isdir(self.path):
            return False
        return len(self.fs.ls(self.path, detail=False)) == 0

    def read_json(self, *parts: str) -> dict[str, Any] | None:
        """A JSON document of the store, or None if it does not exist."""
        try:
            raw = self.fs.cat_file(self.key(*parts))
        except (FileNotFoundError, KeyError):
            return None
        except NotADirectoryError:
            raise StoreFormatError(
                f"{self.url} is a file, not a store folder: pass the folder of a vislens store "
                "(for --out, a new or empty folder)"
            ) from None
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreFormatError(f"{self.url}/{'/'.join(parts)} is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise StoreFormatError(f"{self.url}/{'/'.join(parts)} must hold a JSON object")
        return doc

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """Bytes of every file under ``prefix``, keyed by path relative to the store."""
        base = self.key(prefix) if prefix else self.path
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        root = self.path.rstrip("/") + "/"
        return {k[len(root) :] if k.startswith(root) else k: int(v.get("size") or 0) for k, v in found.items()}

    def remove(self) -> None:
        """Delete the store (used by --overwrite only)."""
        if self.exists():
            self.fs.rm(self.path, recursive=True)
        self.fs.invalidate_cache()


_DIRECTORY = getattr(os, "O_DIRECTORY", None)  # None on Windows, where folders cannot be fsync'd
_KNOWN_DIRS = 4096  # folders remembered as durable per store; forgetting costs only repeated fsyncs


def _fsync(path: str, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(path: str) -> None:
    if _DIRECTORY is not None:
        _fsync(path, os.O_RDONLY | _DIRECTORY)


def _durable_put(path: str, data: Any, root: str, durable_dirs: set[str], exclusive: bool) -> None:
    """Write ``path`` atomically and durably: a temporary file, flushed to the disk, renamed into
    place; then its folder, and the entries of the folders above it, up to and including
    ``root``, that this store has not made durable yet (zarr creates chunk folders on first
    write)."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.partial"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)  # FileExistsError if someone was first
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)
    chain = []
    while folder.startswith(root) and folder not in durable_dirs:
        chain.append(folder)
        folder = os.path.dirname(folder)
    for folder in chain:
        _fsync_folder(os.path.dirname(folder))  # the entry naming `folder`
    if len(durable_dirs) + len(chain) > _KNOWN_DIRS:
        durable_dirs.clear()
    durable_dirs.update(chain)  # only once the whole chain is on disk (other threads rely on it)


class DurableLocalStore(LocalStore):
    """zarr's LocalStore with durable atomic writes: every file is on the disk, under its final
    name, with the folder entries leading to it, before ``set`` returns."""

    @property
    def _durable_dirs(self) -> set[str]:
        return self.__dict__.setdefault("_durable_dir_set", set())

    def _durable_args(self, key: str, value: Any) -> tuple[str, Any, str, set[str]]:
        self._check_writable()
        if not isinstance(value, Buffer):
            raise TypeError(f"DurableLocalStore.set(): value must be a zarr Buffer, got {type(value)}")
        root = os.path.abspath(str(self.root))
        return os.path.join(root, key), value.as_buffer_like(), root, self._durable_dirs

    async def _set(self, key: str, value: Any, exclusive: bool = False) -> None:
        if not self._is_open:
            await self._open()
        await asyncio.to_thread(_durable_put, *self._durable_args(key, value), exclusive)

    def set_sync(self, key: str, value: Any) -> None:
        """Write ``key`` atomically and durably (zarr's synchronous path)."""
        self._ensure_open_sync()
        _durable_put(*self._durable_args(key, value), False)

    async def delete_dir(self, prefix: str) -> None:
        """Delete a folder; folders made again later are made durable again."""
        self._durable_dirs.clear()
        await super().delete_dir(prefix)

    async def clear(self) -> None:
        """Delete everything in the store."""
        self._durable_dirs.clear()
        await super().clear()


def _require(module: str, hint: str) -> None:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{exc}. {hint}") from exc


def as_location(store: str | StoreLocation, storage_options: dict[str, Any] | None = None) -> StoreLocation:
    """Accept a URL/path or a location."""
    if isinstance(store, StoreLocation):
        return store
    return StoreLocation(str(store), dict(storage_options or {}))
