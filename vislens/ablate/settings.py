"""Ablation settings: which image tokens each setting removes, and how.

Every setting removes one interval ``[start, stop)`` of the n image tokens (0-based):

- truncation to k keeps the first k image tokens: ``[k, n)`` removed, always in ``remove`` style;
- masking removes one token ``[i, i + 1)`` or one interval from a list.

Two styles say what "removed" means:

- ``remove``: the tokens are taken out of the input; later positions shift down (the text
  after the image starts at position ``image_start + n - (stop - start)``). This is the truly
  shorter input.
- ``block``: the tokens stay in the input but no other position attends to them (their key
  columns are masked for every later query); every position keeps its index. This is what
  setting their ``attention_mask`` to 0 does in transformers.

Families with a variable number of image tokens (LLaVA-NeXT, Qwen2-VL, Idefics3) get the settings
of the largest n of the run; an input with fewer image tokens runs only the settings that fit it
(`Settings.for_input`: k <= n, or stop <= n), and the others are NaN in the store.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vislens.errors import ConfigError

MODES = ("truncate", "mask")
STYLES = ("remove", "block")


@dataclass(frozen=True)
class Settings:
    """The settings of a run over inputs of ``n_image`` image tokens.

    ``start``, ``stop``: (setting,) int64, the removed interval of each setting.
    """

    mode: str
    style: str
    n_image: int
    start: np.ndarray
    stop: np.ndarray

    def __len__(self) -> int:
        return int(len(self.start))

    @property
    def shift(self) -> bool:
        """Whether positions after a removed interval shift down (``remove`` style)."""
        return self.style == "remove"

    @property
    def k(self) -> np.ndarray:
        """(setting,) image tokens kept before the removed interval (truncation's k)."""
        return self.start

    def for_input(self, n_image: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fits, start, stop) for an input of ``n_image`` image tokens (at most ``self.n_image``).

        ``fits`` (setting,) bool marks the settings that fit the input (truncation: k <= n_image;
        masking: stop <= n_image); ``start``, ``stop`` are the removed intervals of those settings,
        truncation removing ``[k, n_image)`` of this input.
        """
        if self.mode == "truncate":
            fits = self.start <= n_image
            return fits, self.start[fits], np.full(int(fits.sum()), n_image, dtype=np.int64)
        fits = self.stop <= n_image
        return fits, self.start[fits], self.stop[fits]


def parse_ks(text: str) -> tuple[int, ...]:
    """``"1-32,64,576"`` -> (1, 2, ..., 32, 64, 576): counts of kept image tokens, ranges inclusive."""
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if "-" in part:
                low, high = (int(v) for v in part.split("-", 1))
                out += list(range(low, high + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ConfigError(f"--ks takes counts and inclusive ranges like 1-32,64,576; got {part!r}") from None
    if not out:
        raise ConfigError(f"--ks {text!r} names no k")
    return tuple(out)


def parse_intervals(text: str) -> tuple[tuple[int, int], ...]:
    """``"0:8,8:16"`` -> ((0, 8), (8, 16)): 0-based half-open intervals of image tokens."""
    out: list[tuple[int, int]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            start, stop = (int(v) for v in part.split(":"))
        except ValueError:
            raise ConfigError(f"--intervals takes START:STOP pairs (0-based, STOP excluded), got {part!r}") from None
        out.append((start, stop))
    if not out:
        raise ConfigError(f"--intervals {text!r} names no interval")
    return tuple(out)


def tile_intervals(n_image: int, width: int) -> tuple[tuple[int, int], ...]:
    """Consecutive intervals of ``width`` tokens covering ``[0, n_image)`` (the last may be shorter)."""
    if width < 1:
        raise ConfigError(f"interval width must be at least 1, got {width}")
    return tuple((s, min(s + width, n_image)) for s in range(0, n_image, width))


def truncation_settings(n_image: int, ks: tuple[int, ...] | None = None) -> Settings:
    """Keep the first k image tokens for each k (default 1..n_image), sorted, duplicates dropped.

    Raises
    ------
    ConfigError
        If a k is outside 0..n_image.
    """
    values = np.arange(1, n_image + 1) if ks is None else np.unique(np.asarray(ks, dtype=np.int64))
    bad = values[(values < 0) | (values > n_image)]
    if bad.size:
        raise ConfigError(
            f"--ks {bad.tolist()} out of range: the inputs have {n_image} image tokens (k = 0..{n_image})"
        )
    return Settings("truncate", "remove", n_image, values.astype(np.int64), np.full(len(values), n_image))


def masking_settings(
    n_image: int, intervals: tuple[tuple[int, int], ...] | None = None, style: str = "block"
) -> Settings:
    """Remove one interval per setting (default: every single image token), in list order.

    Raises
    ------
    ConfigError
        If the style is unknown or an interval is empty or outside ``[0, n_image)``.
    """
    if style not in STYLES:
        raise ConfigError(f"--mask-style must be one of {STYLES}, got {style!r}")
    pairs = [(i, i + 1) for i in range(n_image)] if intervals is None else list(intervals)
    for start, stop in pairs:
        if not 0 <= start < stop <= n_image:
            raise ConfigError(
                f"interval {start}:{stop} is empty or out of range: the inputs have {n_image} image tokens "
                f"(intervals START:STOP with 0 <= START < STOP <= {n_image})"
            )
    start, stop = (np.asarray(v, dtype=np.int64) for v in zip(*pairs))
    return Settings("mask", style, n_image, start, stop)
