"""Writers' claims: two runs started on one store by mistake never write the same samples.

Writers of one store coordinate through small claim files in a folder beside it
(``<store>.writers/``, outside the Zarr hierarchy, which stays untouched): each live writer
holds one file naming the group and the blocks of samples it will write, or, while it
creates (or replaces) the store, the whole store. A writer first writes its own claim, then
reads the others; any live claim that overlaps its own makes it withdraw and raise
`StoreLockedError` (nothing is written). Two writers that start at the same moment each see
the other's claim (each wrote its own before reading), so at worst both are refused; they can
never both proceed. Writers of disjoint blocks (``--shard i/n``) proceed together.

A claim is live while its writer runs:

- local folders: the writer holds an ``flock`` on its file, which the operating system drops
  when the process ends in any way, so a claim left by a killed process is stale at once;
- object stores (S3, GCS, ...): the writer rewrites its file every `HEARTBEAT_S` seconds; a
  claim whose content does not change for `STALE_BEATS` heartbeats (timed on the reader's own
  clock, so clocks of different machines never matter) is stale.

Stale claims are removed by the next writer. A writer that resumes under the same writer id
(a Dask task retried after its worker died) replaces its own claim at once.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from vislens.errors import StoreLockedError
from vislens.store.location import StoreLocation

log = logging.getLogger("vislens.store")

HEARTBEAT_S = float(os.environ.get("VISLENS_CLAIM_HEARTBEAT_S", "10"))
"""Seconds between rewrites of a claim on an object store."""
STALE_BEATS = 3
"""Heartbeats without change after which a claim on an object store is taken as stale."""
SUFFIX = ".writers"
ALL = "all"
"""The blocks of a claim that covers the whole store (creating or replacing it)."""


def new_writer_id() -> str:
    """A writer id unique to this process and call: host, process id and a random part."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def claims_folder(location: StoreLocation) -> str:
    """The folder (or prefix) of the store's claims, beside the store: ``<store>.writers``."""
    return location.path.rstrip("/") + SUFFIX


@dataclass
class Claim:
    """A claim held by this process; `release` it when the writes are done."""

    location: StoreLocation
    writer_id: str
    doc: dict[str, Any]
    _fd: int | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def path(self) -> str:
        """The claim's file."""
        return f"{claims_folder(self.location)}/{self.writer_id}.json"

    def release(self) -> None:
        """Withdraw the claim (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with _LOCK:
            if _ACTIVE.get(self.path) is self:
                del _ACTIVE[self.path]
        if self.location.is_local:
            if self._fd is not None:
                with contextlib.suppress(FileNotFoundError):
                    if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                        os.unlink(self.path)
                os.close(self._fd)
                self._fd = None
                with contextlib.suppress(OSError):
                    os.rmdir(claims_folder(self.location))  # only when empty
        else:
            with contextlib.suppress(FileNotFoundError):
                self.location.fs.rm(self.path)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.doc["beat"] = int(self.doc.get("beat", 0)) + 1
            try:
                self.location.fs.pipe_file(self.path, _encode(self.doc))
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried; a dead store fails the writes anyway
                log.warning("could not refresh the writer claim %s (%s)", self.path, exc)


_ACTIVE: dict[str, Claim] = {}
_LOCK = threading.Lock()


def release_all(writer_id: str | None = None) -> None:
    """Release the claims this process holds (of one writer id, or all): after a failed task."""
    with _LOCK:
        held = [c for c in _ACTIVE.values() if writer_id is None or c.writer_id == writer_id]
    for claim in held:
        claim.release()


def _encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True).encode()


def _overlaps(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a["blocks"] == ALL or b["blocks"] == ALL:
        return True
    return a.get("group") == b.get("group") and bool(set(a["blocks"]) & set(b["blocks"]))


def _describe(doc: dict[str, Any]) -> str:
    blocks = doc["blocks"]
    if blocks == ALL:
        what = "creating or replacing the whole store"
    else:
        shown = ", ".join(map(str, blocks[:8])) + (", ..." if len(blocks) > 8 else "")
        what = f"{doc.get('what', 'writing')} of {doc.get('group')} (blocks {shown})"
    return f"{what}, on {doc.get('host')} (process {doc.get('pid')}, since {doc.get('started')})"


def claim(
    location: StoreLocation,
    group: str,
    blocks: Iterable[int] | str,
    *,
    writer_id: str | None = None,
    what: str = "writing",
) -> Claim:
    """Claim ``blocks`` of samples of ``group`` (or `ALL`: the whole store) for this writer.

    Raises
    ------
    StoreLockedError
        When another live writer claims an overlapping part of the store; this claim is
        withdrawn and nothing has been written.
    """
    writer_id = writer_id or new_writer_id()
    doc = {
        "writer": writer_id,
        "group": group,
        "blocks": ALL if blocks == ALL else sorted({int(b) for b in blocks}),
        "what": what,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "beat": 0,
    }
    held = Claim(location, writer_id, doc)
    with _LOCK:
        previous = _ACTIVE.get(held.path)
    if previous is not None:  # this process narrows (or widens) its own claim: replace it in place
        previous._stop.set()
    if location.is_local:
        _write_local(held)
    else:
        location.fs.pipe_file(held.path, _encode(doc))
    if previous is not None:
        _drop_handle(previous)
    if not location.is_local:  # beating already while we look at the others: they must see us alive
        held._thread = threading.Thread(target=held._beat, name="vislens-claim", daemon=True)
        held._thread.start()
    try:
        _check_others(held)
    except BaseException:
        held.release()
        raise
    with _LOCK:
        _ACTIVE[held.path] = held
    return held


def _drop_handle(previous: Claim) -> None:
    """Forget an older claim of this process whose file the new one has replaced."""
    if previous._thread is not None:
        previous._thread.join()
    if previous._fd is not None:
        os.close(previous._fd)
        previous._fd = None


def _write_local(held: Claim) -> None:
    """Write the claim file locked: a temporary file, flock'd, then renamed into place."""
    folder = claims_folder(held.location)
    for _ in range(5):  # a writer releasing its claim may remove the empty folder meanwhile
        os.makedirs(folder, exist_ok=True)
        tmp = f"{held.path}.{uuid.uuid4().hex}.partial"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileNotFoundError:
            continue
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX)  # held until the claim is released or the process ends
        os.write(fd, _encode(held.doc))
        os.fsync(fd)
        try:
            os.replace(tmp, held.path)
        except FileNotFoundError:
            os.close(fd)
            continue
        held._fd = fd
        return
    raise OSError(errno.ENOENT, f"cannot write a writer claim in {folder}")


def _read_others(held: Claim) -> dict[str, dict[str, Any]]:
    location, folder = held.location, claims_folder(held.location)
    if location.is_local:
        try:
            names = [n for n in os.listdir(folder) if n.endswith(".json")]
        except FileNotFoundError:
            return {}
        paths = [f"{folder}/{n}" for n in names]
    else:
        location.fs.invalidate_cache(folder)
        try:
            paths = [p for p in location.fs.ls(folder, detail=False) if p.endswith(".json")]
        except FileNotFoundError:
            return {}
    out = {}
    for path in paths:
        if path.rstrip("/").split("/")[-1] == f"{held.writer_id}.json":
            continue
        raw = _read(location, path)
        if raw is not None:
            try:
                out[path] = json.loads(raw)
            except json.JSONDecodeError:
                continue  # being written: a writer with a claim in progress re-reads ours
    return out


def _read(location: StoreLocation, path: str) -> bytes | None:
    try:
        if location.is_local:
            with open(path, "rb") as f:
                return f.read()
        return location.fs.cat_file(path)
    except FileNotFoundError:
        return None


def _local_alive(path: str) -> bool:
    """Whether a process holds the flock of a local claim; removes the file when none does."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        with contextlib.suppress(FileNotFoundError):  # stale: remove it, unless it was replaced meanwhile
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.unlink(path)
        return False
    finally:
        os.close(fd)


def _check_others(held: Claim) -> None:
    others = {p: d for p, d in _read_others(held).items() if _overlaps(held.doc, d)}
    if not others:
        return
    if held.location.is_local:
        live = {p: d for p, d in others.items() if _local_alive(p)}
    else:
        live = _remote_live(held, others)
    if live:
        doc = next(iter(live.values()))
        raise StoreLockedError(
            f"{held.location.url}: another writer is {_describe(doc)}; two writers of the same samples would "
            "corrupt the store, so this run writes nothing. Wait for that run to finish (then rerun this command "
            "to resume), or give the runs disjoint --shard i/n. If it is not running any more, rerun: a dead "
            f"writer's claim (in {claims_folder(held.location)}) is recognised as stale "
            + ("at once." if held.location.is_local else f"after {STALE_BEATS * HEARTBEAT_S:.0f} s.")
        )


def _remote_live(held: Claim, others: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The claims among ``others`` that change within `STALE_BEATS` heartbeats (the rest are stale
    and removed); returns as soon as one is seen alive."""
    fs, seen = held.location.fs, {p: _encode(d) for p, d in others.items()}
    log.info(
        "waiting up to %.0f s to see whether the writers of %d claims are alive", STALE_BEATS * HEARTBEAT_S, len(seen)
    )
    deadline = time.monotonic() + STALE_BEATS * HEARTBEAT_S
    while seen:
        for path in list(seen):
            raw = _read(held.location, path)
            if raw is None:  # released meanwhile
                del seen[path]
            elif raw != seen[path]:  # alive; conflicting unless it no longer overlaps (narrowed)
                try:
                    doc = json.loads(raw)
                except json.JSONDecodeError:
                    continue
                if _overlaps(held.doc, doc):
                    return {path: doc}
                del seen[path]
        if time.monotonic() >= deadline:
            break
        time.sleep(min(HEARTBEAT_S / 4, max(0.0, deadline - time.monotonic())))
    for path in seen:
        log.warning("removing the stale writer claim %s (no heartbeat for %.0f s)", path, STALE_BEATS * HEARTBEAT_S)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path)
    return {}
