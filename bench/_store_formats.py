"""The formats that bench/store.py compares, the data it writes, and how it makes I/O durable and cold.

Each `Candidate` writes N samples (layer, token, hidden) float16 into its own folder, durably (every
file and its folder fsync'd before `write` returns: by the candidate here, by vislens's own store
for vislens), and hands out `Reader`s for the two read patterns.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import safetensors
import safetensors.numpy
import torch
import zarr
from safetensors import safe_open

from vislens.store import (
    CaptionData,
    Layout,
    PipelinedWriter,
    StoreSpec,
    StoreWriter,
    as_location,
    open_store,
    prepare_store,
    read_layer,
)

# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Profile:
    """A model's fixed statistics: std (layer,), scale and mean (layer, hidden), outlier dims."""

    std: np.ndarray
    scale: np.ndarray
    mean: np.ndarray
    outliers: np.ndarray


def make_profile(rng: np.random.Generator, n_layers: int, hidden: int) -> Profile:
    """Residual-stream statistics of a Llama-like decoder (see the module docstring)."""
    std = 0.02 * 150.0 ** np.linspace(0, 1, n_layers - 1)
    std = np.append(std, 1.5)  # the last hidden state is after the final norm
    scale = np.exp(rng.normal(0, 0.3, (n_layers, hidden)))
    outliers = rng.choice(hidden, size=min(6, hidden), replace=False)
    scale[1:, outliers] *= rng.uniform(10, 40, len(outliers))
    mean = 0.3 * rng.standard_normal((n_layers, hidden))  # in units of each dimension's std
    return Profile(std.astype(np.float32), scale.astype(np.float32), mean.astype(np.float32), outliers)


def make_sample(rng: np.random.Generator, profile: Profile, n_tokens: int) -> np.ndarray:
    """One sample of hidden states, (layer, token, hidden) float16."""
    n_layers, hidden = profile.scale.shape
    out = np.empty((n_layers, n_tokens, hidden), np.float16)
    for layer in range(n_layers):
        z = rng.standard_normal((n_tokens, hidden), dtype=np.float32)
        z *= np.exp(rng.normal(0, 0.25, (n_tokens, 1))).astype(np.float32)
        z += profile.mean[layer]
        z *= profile.std[layer] * profile.scale[layer]
        out[layer] = z
    massive, sign = profile.outliers[:2], np.array([1, -1])[: len(profile.outliers[:2])]
    out[2:, 0, massive] = rng.uniform(200, 800, (n_layers - 2, len(massive))) * sign
    return out


def iid_sample(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """i.i.d. N(0, 1) float16: data without any of a model's structure."""
    return rng.standard_normal(shape, dtype=np.float32).astype(np.float16)


# --------------------------------------------------------------------------- durability, cache


def fsync_path(path: Path) -> None:
    """fsync one file or folder by path (flushes its dirty pages whichever descriptor wrote them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def folder_bytes(root: Path) -> int:
    """Sum of the sizes of the files under root."""
    return sum((Path(d) / f).stat().st_size for d, _, files in os.walk(root) for f in files)


def drop_cache(root: Path, method: str = "drop_caches") -> str:
    """Evict root's files from the page cache; returns the method that worked.

    ``drop_caches`` empties the whole page cache (root only; also evicts library code, and other
    processes' files); ``fadvise`` (also the fallback) evicts only root's files.
    """
    os.sync()
    try:
        if method != "drop_caches":
            raise PermissionError
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for folder, _, files in os.walk(root):
            for name in files:
                fd = os.open(Path(folder) / name, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
        return "posix_fadvise(DONTNEED)"


# --------------------------------------------------------------------------- candidates


@dataclass(frozen=True)
class Reader:
    """How one candidate is read: open() once, then sample(handle, i) (if it reads samples) and layer(handle, l)."""

    label: str
    open: Callable[[], Any]
    sample: Callable[[Any, int], np.ndarray] | None
    layer: Callable[[Any, int], np.ndarray]


class Candidate:
    """A format that writes N samples durably into its own folder and reads them back."""

    name = ""

    def __init__(self, folder: Path, n: int, shape: tuple[int, int, int]) -> None:
        self.folder, self.n, self.shape = folder, n, shape

    def reset(self) -> None:
        """Untimed: remove the previous repetition's files and make an empty folder."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)

    def write(self, data: list[np.ndarray]) -> None:
        raise NotImplementedError

    def readers(self) -> list[Reader]:
        raise NotImplementedError

    def file(self, i: int, suffix: str) -> Path:
        return self.folder / f"{i:05d}{suffix}"

    def per_file_readers(
        self, suffix: str, load: Callable[[Path], np.ndarray], layer: Callable[[Path, int], np.ndarray]
    ) -> list[Reader]:
        def sample(_: Any, i: int) -> np.ndarray:
            return load(self.file(i, suffix))

        def one_layer(_: Any, j: int) -> np.ndarray:
            return np.stack([layer(self.file(i, suffix), j) for i in range(self.n)])

        return [Reader(self.name, lambda: None, sample, one_layer)]


class Raw(Candidate):
    """Plain write() of each sample's float16 bytes, one file per sample."""

    name = "raw"

    def write(self, data: list[np.ndarray]) -> None:
        for i, x in enumerate(data):
            with open(self.file(i, ".bin"), "wb") as f:
                f.write(memoryview(x).cast("B"))
                f.flush()
                os.fsync(f.fileno())
        fsync_path(self.folder)

    def readers(self) -> list[Reader]:
        layer_shape = self.shape[1:]
        layer_bytes = int(np.prod(layer_shape)) * 2

        def load(path: Path) -> np.ndarray:
            return np.fromfile(path, dtype=np.float16).reshape(self.shape)

        def layer(path: Path, j: int) -> np.ndarray:
            out = np.empty(layer_shape, np.float16)
            with open(path, "rb", buffering=0) as f:
                f.seek(j * layer_bytes)
                f.readinto(memoryview(out).cast("B"))
            return out

        return self.per_file_readers(".bin", load, layer)


class Safetensors(Candidate):
    """safetensors.numpy.save_file per sample; layers read through a lazy slice (mmap)."""

    name = "safetensors"

    def write(self, data: list[np.ndarray]) -> None:
        for i, x in enumerate(data):
            path = self.file(i, ".safetensors")
            safetensors.numpy.save_file({"hidden": x}, path)
            fsync_path(path)
        fsync_path(self.folder)

    def readers(self) -> list[Reader]:
        def load(path: Path) -> np.ndarray:
            return safetensors.numpy.load_file(path)["hidden"]

        def layer(path: Path, j: int) -> np.ndarray:
            with safe_open(path, framework="np") as f:
                return f.get_slice("hidden")[j]

        return self.per_file_readers(".safetensors", load, layer)


class TorchSave(Candidate):
    """torch.save of a tensor per sample; layers read with torch.load(mmap=True)."""

    name = "torch.save"

    def write(self, data: list[np.ndarray]) -> None:
        for i, x in enumerate(data):
            with open(self.file(i, ".pt"), "wb") as f:
                torch.save(torch.from_numpy(x), f)
                f.flush()
                os.fsync(f.fileno())
        fsync_path(self.folder)

    def readers(self) -> list[Reader]:
        def load(path: Path) -> np.ndarray:
            return torch.load(path, weights_only=True).numpy()

        def layer(path: Path, j: int) -> np.ndarray:
            return torch.load(path, weights_only=True, mmap=True)[j].numpy().copy()

        return self.per_file_readers(".pt", load, layer)


class HDF5(Candidate):
    """One h5py file, dataset (sample, layer, token, hidden) chunked per (sample, layer), gzip."""

    def __init__(
        self, folder: Path, n: int, shape: tuple[int, int, int], level: int = 4, shuffle: bool = False
    ) -> None:
        super().__init__(folder, n, shape)
        self.level, self.shuffle = level, shuffle
        self.name = f"hdf5-gzip{level}" + ("+shuffle" if shuffle else "")

    def write(self, data: list[np.ndarray]) -> None:
        path = self.folder / "hidden.h5"
        with h5py.File(path, "w") as f:
            chunks = (1, 1) + self.shape[1:]
            dset = f.create_dataset(
                "hidden", (self.n, *self.shape), np.float16, chunks=chunks,
                compression="gzip", compression_opts=self.level, shuffle=self.shuffle,
            )  # fmt: skip
            for i, x in enumerate(data):
                dset[i] = x
            f.flush()
        fsync_path(path)
        fsync_path(self.folder)

    def readers(self) -> list[Reader]:
        def open_() -> Any:
            return h5py.File(self.folder / "hidden.h5", "r")["hidden"]

        return [Reader(self.name, open_, lambda d, i: d[i], lambda d, j: d[:, j])]


class Vislens(Candidate):
    """The vislens store as `vislens extract` writes it: `prepare_store`, then a `PipelinedWriter`
    (big arrays of consecutive samples on two threads, done flags in order).

    Durable as it writes (each file fsync'd with its folder before the write returns), so `write`
    adds no fsync of its own.
    """

    def __init__(
        self, folder: Path, n: int, shape: tuple[int, int, int], clevel: int, keep_bits: int | None = None
    ) -> None:
        super().__init__(folder, n, shape)
        self.clevel, self.keep_bits = clevel, keep_bits
        self.name = f"vislens-c{clevel}" + (f"-keep{keep_bits}" if keep_bits else "")
        self.writer: StoreWriter | None = None

    def spec(self) -> StoreSpec:
        n, (layers, tokens, hidden) = self.n, self.shape
        layout = Layout(n_samples=n, n_layers=layers, n_tokens=tokens, d_model=hidden, n_heads=1, n_query=0,
                        vocab=1, n_images=n, n_captions=1)  # fmt: skip
        strings = np.asarray([f"img{i}" for i in range(n)], dtype=np.dtypes.StringDType())
        plan = {name: strings for name in ("image_id", "prompt_kind", "prompt_id", "prompt_text")}
        plan["image_index"] = np.arange(n, dtype=np.int32)
        attrs = {"keep_bits": self.keep_bits, "n_samples": n}
        captions = CaptionData(list(strings), [("a caption",)] * n)
        return StoreSpec(layout, attrs, f"bench-store-{self.name}", plan, captions, clevel=self.clevel)

    def reset(self) -> None:
        """Untimed: a fresh store (creation is timed separately by the caller)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.writer = prepare_store(as_location(str(self.folder)), self.spec())

    def write(self, data: list[np.ndarray]) -> None:
        self.write_background(lambda i: data[i])

    def write_background(self, make: Callable[[int], np.ndarray]) -> None:
        """The extraction's pattern: generate sample i + 1 while the writer's threads write earlier ones."""
        pipeline = PipelinedWriter(self.writer)
        try:
            for i in range(self.n):
                pipeline.write_sample(i, {"hidden": make(i)})
        finally:
            pipeline.close()

    def readers(self) -> list[Reader]:
        def open_xarray() -> Any:
            return open_store(str(self.folder))["activations"]["hidden"]

        def open_zarr() -> Any:
            return zarr.open_array(
                zarr.storage.LocalStore(self.folder, read_only=True), path="activations/hidden", mode="r"
            )

        xarray = Reader(
            f"{self.name} xarray",
            open_xarray,
            lambda h, i: h.isel(sample=i).values,
            lambda h, j: h.isel(layer=j).values,
        )
        plain = Reader(f"{self.name} zarr", open_zarr, lambda a, i: a[i], lambda a, j: a[:, j])
        layer = Reader(f"{self.name} read_layer", lambda: str(self.folder), None, read_layer)
        return [xarray, plain, layer]
