"""The ``ablation`` group: caption loss with image tokens truncated or masked. Knows nothing of models.

One group per ablation run (default name ``ablation``), in a new store or beside an extraction.
Dimensions: ``sample`` (an image of the data set), ``prompt``, ``k`` (truncation: image tokens
kept) or ``setting`` (masking: one interval ``[start, stop)`` of image tokens each),
``caption_token`` (scored caption tokens, in order) and ``token`` (positions of the full,
unablated input). Per (sample, prompt):

- ``loss`` (sample, prompt, k) or ``masked_loss`` (sample, prompt, setting) float32: mean
  cross-entropy over the caption tokens; ``token_loss`` (..., caption_token) per token, if kept.
- ``full_loss`` (sample, prompt) float32 and ``full_token_loss``: the same without ablation.
- ``token_id``, ``modality`` (0 padding, 1 image, 2 text) and ``scored`` (sample, prompt, token):
  the full input and which positions are scored, enough to recompute any setting.
- ``done`` (sample, prompt) uint8: 1 is written only after all of the pair's data (resumable).

Arrays are written pair by pair into pre-allocated arrays; the group's attributes hold the run's
fingerprint, so a rerun with other arguments is refused instead of mixing results.
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from vislens.errors import StoreFormatError, StoreMismatchError
from vislens.store import claims, schema
from vislens.store.create import STATUS_CREATING, STATUS_READY, CaptionData, captions_dataset, consolidate, small_codecs
from vislens.store.location import StoreLocation
from vislens.store.writer import existing_root, shard_blocks

GROUP = "ablation"
MODES = ("truncate", "mask")
STATUS_ATTR = "vislens_ablation_status"
ABLATION_ONLY_ATTR = "vislens_ablation_only"
TOKEN_LOSS_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class AblationLayout:
    """Sizes and settings of an ablation group (fixed at creation).

    Parameters
    ----------
    mode : ``truncate`` (dimension ``k``) or ``mask`` (dimension ``setting``).
    n_samples, n_prompts : images and prompts.
    n_tokens, n_caption_tokens : longest full input and longest scored caption.
    n_image_tokens : image tokens of every input (the most of any input where images differ).
    start, stop : (setting,) int32 removed image tokens ``[start, stop)`` of each setting
        (truncation to k keeps ``[0, k)``: start = k, stop = n_image_tokens).
    token_loss : dtype of ``token_loss`` (``float32``, ``float16``) or None to leave it out.
    block : samples per chunk of the (sample, prompt) arrays.
    """

    mode: str
    n_samples: int
    n_prompts: int
    n_tokens: int
    n_caption_tokens: int
    n_image_tokens: int
    start: np.ndarray
    stop: np.ndarray
    token_loss: str | None = "float32"
    block: int = 64

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.token_loss is not None and self.token_loss not in TOKEN_LOSS_DTYPES:
            raise ValueError(f"token_loss must be one of {TOKEN_LOSS_DTYPES} or None, got {self.token_loss!r}")

    @property
    def setting_dim(self) -> str:
        """``k`` for truncation, ``setting`` for masking."""
        return "k" if self.mode == "truncate" else "setting"

    @property
    def loss_name(self) -> str:
        """``loss`` for truncation, ``masked_loss`` for masking."""
        return "loss" if self.mode == "truncate" else "masked_loss"

    @property
    def n_settings(self) -> int:
        """Settings per pair."""
        return int(len(self.start))


@dataclass(frozen=True)
class AblationSpec:
    """Everything needed to create an ablation group (and, for a new store, the store itself).

    ``args`` are the options that determine the content (stored as the group's ``args``);
    ``image_id``, ``image_index`` (into ``captions/image``) and ``caption`` (the scored
    reference caption) are per sample; ``prompt_id`` and ``prompt_text`` per prompt.
    """

    layout: AblationLayout
    fingerprint: str
    args: dict[str, Any]
    attrs: dict[str, Any]
    image_id: list[str]
    image_index: np.ndarray
    caption: list[str]
    prompt_id: list[str]
    prompt_text: list[str]
    captions: CaptionData
    root_attrs: dict[str, Any] = field(default_factory=dict)


def _strings(values: list[str]) -> np.ndarray:
    return np.asarray(values, dtype=np.dtypes.StringDType())


def _per_pair(layout: AblationLayout) -> list[tuple[str, tuple[str, ...], str, Any, str]]:
    """(name, dims, dtype, fill value, description) of every per-pair array, ``done`` last."""
    dim = layout.setting_dim
    what = "image tokens kept" if layout.mode == "truncate" else "image-token interval removed"
    out = [
        (layout.loss_name, ("sample", "prompt", dim), "float32", np.nan, f"mean caption cross-entropy, {what}"),
        ("full_loss", ("sample", "prompt"), "float32", np.nan, "mean caption cross-entropy with every image token"),
        ("full_token_loss", ("sample", "prompt", "caption_token"), "float32", np.nan, "per-token loss, no ablation"),
        ("token_id", ("sample", "prompt", "token"), "int32", -1, "token ids of the full input; -1 pads"),
        ("modality", ("sample", "prompt", "token"), "uint8", schema.PADDING, "0 padding, 1 image, 2 text"),
        ("scored", ("sample", "prompt", "token"), "bool", False, "caption tokens whose cross-entropy is scored"),
        ("n_tokens", ("sample", "prompt"), "int32", 0, "valid positions of the full input"),
        ("n_image_tokens", ("sample", "prompt"), "int32", 0, "image tokens of the full input"),
    ]
    if layout.token_loss is not None:
        dims = ("sample", "prompt", dim, "caption_token")
        out.insert(1, ("token_loss", dims, layout.token_loss, np.nan, f"per-token caption cross-entropy, {what}"))
    done = "1 = written (only after all of the pair's data), 2 = skipped (unreadable image)"
    return out + [("done", ("sample", "prompt"), "uint8", schema.PENDING, done)]


def _chunking(dims: tuple[str, ...], shape: tuple[int, ...], block: int) -> tuple[tuple[int, ...], tuple | None]:
    if len(dims) == 2:
        return (min(block, shape[0]), shape[1]), None
    return (1, 1) + shape[2:], (1,) + shape[1:]


def ablation_dataset(spec: AblationSpec) -> tuple[xr.Dataset, dict[str, Any]]:
    """The group as a Dataset (per-pair arrays as lazy fill templates) and its encoding."""
    layout = spec.layout
    sizes = {
        "sample": layout.n_samples,
        "prompt": layout.n_prompts,
        layout.setting_dim: layout.n_settings,
        "caption_token": layout.n_caption_tokens,
        "token": layout.n_tokens,
    }
    data, encoding = {}, {}
    for name, dims, dtype, fill, doc in _per_pair(layout):
        shape = tuple(sizes[d] for d in dims)
        chunk, shard = _chunking(dims, shape, layout.block)
        data[name] = xr.Variable(dims, da.full(shape, fill, dtype=dtype, chunks=shard or chunk), {"long_name": doc})
        encoding[name] = {"chunks": chunk, "compressors": small_codecs(), "fill_value": fill}
        if shard is not None:
            encoding[name]["shards"] = shard
    start, stop = layout.start.astype(np.int32), layout.stop.astype(np.int32)
    coords: dict[str, Any] = {
        "sample": ("sample", np.arange(layout.n_samples, dtype=np.int64)),
        "prompt": ("prompt", np.arange(layout.n_prompts, dtype=np.int64)),
        "caption_token": ("caption_token", np.arange(layout.n_caption_tokens, dtype=np.int32)),
        "image_id": ("sample", _strings(spec.image_id), {"long_name": "id of the image"}),
        "image_index": ("sample", spec.image_index.astype(np.int32), {"long_name": "row of captions/image"}),
        "caption": ("sample", _strings(spec.caption), {"long_name": "the scored reference caption"}),
        "prompt_id": ("prompt", _strings(spec.prompt_id)),
        "prompt_text": ("prompt", _strings(spec.prompt_text), {"long_name": "instruction before the chat template"}),
    }
    if layout.mode == "truncate":
        coords["k"] = ("k", start, {"long_name": "image tokens kept (the first k)"})
    else:
        coords["setting"] = ("setting", np.arange(layout.n_settings, dtype=np.int32))
        coords["start"] = ("setting", start, {"long_name": "first masked image token (0-based)"})
        coords["stop"] = ("setting", stop, {"long_name": "one past the last masked image token"})
    ds = xr.Dataset(data, coords=coords)
    for name in ds.variables:  # coordinates too: every array gets its checksum
        encoding.setdefault(name, {"compressors": small_codecs()})
    ds.attrs = {
        **spec.attrs,
        "args": spec.args,
        "vislens_fingerprint": spec.fingerprint,
        STATUS_ATTR: STATUS_CREATING,
        "mode": layout.mode,
        "n_image_tokens": layout.n_image_tokens,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    return ds, encoding


class AblationWriter:
    """Writes (sample, prompt) pairs into an existing, ready ablation group."""

    def __init__(self, location: StoreLocation, group: str = GROUP) -> None:
        self.location, self.group = location, group
        root = zarr.open_group(location.zarr_store(read_only=False), mode="r+", zarr_format=3, use_consolidated=False)
        self.arrays = dict(root[group].arrays())
        self.done = self.arrays["done"]
        self.block = int(self.done.chunks[0])
        """Samples per file of the (sample, prompt) arrays: a ``--shard i/n`` writer owns whole blocks."""
        self.held: claims.Claim | None = None

    def status(self) -> np.ndarray:
        """(sample, prompt) uint8: 0 pending, 1 done, 2 skipped."""
        return np.asarray(self.done[:])

    def owned(self, shard: tuple[int, int] = (0, 1)) -> np.ndarray:
        """The samples (images) of shard ``(i, n)``: blocks i, i + n, ... (`shard_blocks`)."""
        return shard_blocks(int(self.done.shape[0]), self.block, shard)

    def pending(self, shard: tuple[int, int] = (0, 1)) -> list[tuple[int, int]]:
        """(sample, prompt) pairs of ``shard`` not yet done, sample-major (skipped ones are tried again)."""
        mine = np.zeros(self.done.shape[0], dtype=bool)
        mine[self.owned(shard)] = True
        return [(int(s), int(p)) for s, p in np.argwhere((self.status() != schema.DONE) & mine[:, None])]

    def claim(self, shard: tuple[int, int] = (0, 1), writer_id: str | None = None) -> None:
        """Claim the blocks of ``shard`` with pending pairs (`vislens.store.claims`); `close` releases it.

        Raises
        ------
        StoreLockedError
            When another live writer of this group holds any of them.
        """
        blocks = sorted({s // self.block for s, _ in self.pending(shard)})
        if not blocks:
            self.close()
            return
        self.held = claims.claim(
            self.location, self.group, blocks, writer_id=writer_id, what=f"shard {shard[0]}/{shard[1]}"
        )

    def close(self) -> None:
        """Release this writer's claim (call once every pair is written)."""
        if self.held is not None:
            self.held.release()
            self.held = None

    def write_pair(self, sample: int, prompt: int, arrays: dict[str, np.ndarray]) -> None:
        """Write one pair's arrays (padded to the group's shapes), then its done flag."""
        for name, value in arrays.items():
            if name not in self.arrays or name == "done":
                raise StoreFormatError(f"the ablation group has no array {name!r} to write")
            target = self.arrays[name]
            target[sample, prompt] = _pad(np.asarray(value), target.shape[2:], target.fill_value, name)
        self.done[sample, prompt] = schema.DONE

    def mark_skipped(self, sample: int, prompt: int) -> None:
        """Flag a pair whose image could not be read."""
        self.done[sample, prompt] = schema.SKIPPED


def _pad(value: np.ndarray, shape: tuple[int, ...], fill: Any, name: str) -> np.ndarray:
    if value.shape == shape:
        return value
    if value.ndim != len(shape) or any(v > s for v, s in zip(value.shape, shape)):
        raise StoreFormatError(f"{name}: pair of shape {value.shape} does not fit the group's {shape}")
    out = np.full(shape, fill, dtype=value.dtype)
    out[tuple(slice(0, n) for n in value.shape)] = value
    return out


def _group_attrs(location: StoreLocation, group: str) -> dict[str, Any] | None:
    doc = location.read_json(group, "zarr.json")
    return None if doc is None else doc.get("attributes", {})


def group_ready(location: StoreLocation, group: str = GROUP) -> bool:
    """Whether the store holds the ablation group ``group``, ready to be written and read."""
    location.fs.invalidate_cache()
    attrs = _group_attrs(location, group) if location.exists() else None
    return bool(attrs) and attrs.get(STATUS_ATTR) == STATUS_READY


def _create_root(location: StoreLocation, spec: AblationSpec) -> None:
    location.remove()
    store = location.zarr_store(read_only=False)
    attrs = {
        "vislens_format_version": schema.FORMAT_VERSION,
        "vislens_status": STATUS_CREATING,
        "vislens_fingerprint": spec.fingerprint,
        ABLATION_ONLY_ATTR: True,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **spec.root_attrs,
    }
    root = zarr.open_group(store, mode="w", zarr_format=3, attributes=attrs)
    ds, encoding = captions_dataset(spec.captions)
    ds.to_zarr(store, group="captions", mode="a", encoding=encoding, zarr_format=3, consolidated=False)
    root.create_group("results", attributes={"long_name": "cached analysis results"})


def _create_group(location: StoreLocation, spec: AblationSpec, group: str, *, ready: bool = True) -> None:
    if location.exists() and location.fs.exists(location.key(group)):
        location.fs.rm(location.key(group), recursive=True)
        location.fs.invalidate_cache()
    store = location.zarr_store(read_only=False)
    ds, encoding = ablation_dataset(spec)
    ds.to_zarr(store, group=group, mode="a", compute=False, encoding=encoding, zarr_format=3, consolidated=False)
    if ready:
        _mark_ready(location, spec, group)
    else:
        consolidate(store)


def _mark_ready(location: StoreLocation, spec: AblationSpec, group: str) -> None:
    """The group's status, then (an ablation-only store's) root's, to ``ready``; consolidated."""
    store = location.zarr_store(read_only=False)
    root = zarr.open_group(store, mode="r+", zarr_format=3, use_consolidated=False)
    root[group].attrs.update({STATUS_ATTR: STATUS_READY})
    if root.attrs.get(ABLATION_ONLY_ATTR):  # the root's provenance is that of the latest ablation
        root.attrs.update({**spec.root_attrs, "vislens_fingerprint": spec.fingerprint})
    root.attrs.update({"vislens_status": STATUS_READY})
    consolidate(store)


def _differences(stored: dict[str, Any], asked: dict[str, Any]) -> str:
    keys = sorted(k for k in set(stored) | set(asked) if stored.get(k) != asked.get(k))
    if not keys:
        return "same options, different images, captions or prompts"
    return "; ".join(f"{k}: stored {stored.get(k)!r}, asked {asked.get(k)!r}" for k in keys)


def prepare_ablation(
    location: StoreLocation,
    spec: AblationSpec,
    *,
    group: str = GROUP,
    overwrite: bool = False,
    creator: bool = True,
    wait_s: float = 600.0,
    shard: tuple[int, int] = (0, 1),
    writer_id: str | None = None,
    claim: bool = True,
) -> AblationWriter:
    """Create the ablation group (and the store, if new), or reopen it to resume the same run; the
    writer returned holds a claim on the blocks of ``shard`` it will write (release with ``close``).

    ``creator`` is False for shard writers other than shard 0: they wait for the group to be
    ready instead of creating it. Creating the group claims all of it (a new store: all of the
    store), so a second run started on it meanwhile is refused instead of deleting it.

    Raises
    ------
    StoreExistsError
        When the path holds something that is not a vislens store.
    StoreFormatError
        When the vislens store there is still being created by another command.
    StoreMismatchError
        When the group was made by a run with other arguments (and ``overwrite`` is False).
    StoreLockedError
        When another live writer holds pairs this writer would write (nothing is written).
    """
    writer_id = writer_id or claims.new_writer_id()
    writer = _reopen(location, spec, group, overwrite=overwrite, creator=creator, wait_s=wait_s)
    if writer is not None:
        if claim:
            writer.claim(shard, writer_id)
        return writer
    attrs = existing_root(location)
    new_store = attrs is None or attrs.get("vislens_status") != STATUS_READY
    n_blocks = -(-spec.layout.n_samples // spec.layout.block)
    scope = claims.ALL if new_store else range(n_blocks)
    whole = claims.claim(location, group, scope, writer_id=writer_id, what="creating") if claim else None
    try:
        writer = _reopen(location, spec, group, overwrite=overwrite, creator=True, wait_s=wait_s)  # made meanwhile?
        if writer is None:
            if new_store:  # new, or our own half-created store
                _create_root(location, spec)
            _create_group(location, spec, group, ready=False)
            writer = AblationWriter(location, group)
            writer.held = whole
            if claim:
                writer.claim(shard, writer_id)  # narrowed before other shards may start: they wait for ready
            _mark_ready(location, spec, group)
            return writer
    except BaseException:
        if whole is not None:
            whole.release()
        raise
    writer.held = whole
    if claim:
        writer.claim(shard, writer_id)
    return writer


def _reopen(
    location: StoreLocation, spec: AblationSpec, group: str, *, overwrite: bool, creator: bool, wait_s: float
) -> AblationWriter | None:
    """A writer on this run's group if it is there (or, for a non-creator, once shard 0 made it);
    None when it must be created or replaced."""
    attrs = existing_root(location)
    if attrs is not None and attrs.get("vislens_status") != STATUS_READY and not attrs.get(ABLATION_ONLY_ATTR):
        raise StoreFormatError(
            f"{location.url} is still being created by `vislens extract` (status {attrs.get('vislens_status')!r}); "
            "let it finish (or rerun it), then add the ablation"
        )
    existing = _group_attrs(location, group) if attrs is not None else None
    if existing is not None and existing.get(STATUS_ATTR) == STATUS_READY:
        if existing.get("vislens_fingerprint") == spec.fingerprint:
            return AblationWriter(location, group)
        if not overwrite:
            raise StoreMismatchError(
                f"{location.url} group {group!r} holds an ablation with different arguments "
                f"({_differences(existing.get('args') or {}, spec.args)}); rerun with the original arguments to "
                "resume, write to another --out or --group, or pass --overwrite to replace that group"
            )
    if not creator:
        return _wait_ready(location, spec, group, wait_s)
    return None


def _wait_ready(location: StoreLocation, spec: AblationSpec, group: str, wait_s: float) -> AblationWriter:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        location.fs.invalidate_cache()
        existing = _group_attrs(location, group)
        if existing and existing.get(STATUS_ATTR) == STATUS_READY:
            if existing.get("vislens_fingerprint") != spec.fingerprint:
                raise StoreMismatchError(
                    f"{location.url} group {group!r} was created by shard 0 for a different ablation; "
                    "run every shard with the same arguments"
                )
            return AblationWriter(location, group)
        time.sleep(0.5)
    raise TimeoutError(
        f"{location.url} group {group!r} was not created within {wait_s:.0f} s; shard 0 creates it, so start it first"
    )


__all__ = [
    "AblationLayout",
    "AblationSpec",
    "AblationWriter",
    "GROUP",
    "MODES",
    "ablation_dataset",
    "group_ready",
    "prepare_ablation",
]
