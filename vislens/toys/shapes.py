"""The shapes world: a deterministic synthetic image-caption data set that the toy VLLMs learn.

One to three coloured shapes (circle, square, triangle, cross) sit centred in distinct cells of a
3 x 3 grid on a white, gray or black background (48 pixels: each cell is 2 x 2 patches of the
toys' 8-pixel patches; no jitter, one size, which a tiny vision tower learns from scratch in
minutes: with random offsets and sizes the toys learned colours and positions but not shapes). Every scene has one caption per template:

- positions: ``a red circle at the top left and a blue square at the bottom``
- relation:  ``a red circle above a blue square`` (the first two shapes in reading order;
  a third is added with its position)
- count:     ``two shapes on a gray background: a red circle and a blue square``

Scene ``i`` of a split is a pure function of (split, i): the same index always gives the same
scene, image bytes and captions. The held-out split holds every scene whose layout key (shapes,
colours, cells) hashes to 0 mod 10; the train split never draws one, so held-out scenes are
configurations the toys never saw. `make_shapes` writes a split as PNG images plus a vislens
JSONL manifest that every command reads (``synthetic:N`` is the first N held-out scenes).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from vislens.errors import ConfigError

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 30),
    "purple": (150, 60, 190),
    "orange": (250, 140, 20),
}
BACKGROUNDS = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle", "cross")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
COUNTS = ("one", "two", "three")
TEMPLATES = ("positions", "relation", "count")
SPLITS = {"train": 1, "test": 2}
HELD_OUT_MOD = 10
SHAPES_VERSION = 1
"""Bumped whenever a scene, image or caption changes (cached copies are then rebuilt)."""
RADIUS = 0.15
IMAGE_SIZE = 48
"""Pixels of a written image (the toys' processors take it as is)."""
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Shape:
    """One shape: its kind, colour and grid cell (drawn centred in the cell, `RADIUS` of the image side)."""

    kind: str
    colour: str
    row: int
    col: int

    @property
    def position(self) -> str:
        """``top left``, ``top``, ..., ``center``, ..., ``bottom right``."""
        row, col = ROWS[self.row], COLS[self.col]
        if row == "middle":
            return col
        return row if col == "center" else f"{row} {col}"

    @property
    def noun_phrase(self) -> str:
        """``a red circle``, ``an orange square``."""
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    """A background and one to three shapes in reading order (row, then column)."""

    background: str
    shapes: tuple[Shape, ...]

    @property
    def key(self) -> str:
        """The layout: what decides the split (the background excluded)."""
        return ";".join(f"{s.kind}/{s.colour}/{s.row}{s.col}" for s in self.shapes)


def is_held_out(scene: Scene) -> bool:
    """Whether a scene's layout belongs to the held-out split."""
    digest = hashlib.sha256(scene.key.encode()).digest()
    return int.from_bytes(digest[:4], "little") % HELD_OUT_MOD == 0


def _draw_scene(rng: np.random.Generator) -> Scene:
    n = int(rng.choice([1, 2, 3], p=[0.25, 0.4, 0.35]))
    cells = sorted(int(c) for c in rng.choice(9, size=n, replace=False))
    colours = rng.choice(list(COLOURS), size=n, replace=True)
    kinds = rng.choice(SHAPES, size=n, replace=True)
    shapes = []
    for cell, colour, kind in zip(cells, colours, kinds, strict=True):
        shapes.append(Shape(str(kind), str(colour), cell // 3, cell % 3))
    return Scene(str(rng.choice(list(BACKGROUNDS))), tuple(shapes))


def scene(split: str, index: int) -> Scene:
    """Scene ``index`` of ``split`` (``train`` or ``test``), a pure function of both."""
    if split not in SPLITS:
        raise ConfigError(f"unknown shapes-world split {split!r}; choose one of {', '.join(SPLITS)}")
    rng = np.random.default_rng([SPLITS[split], index])
    while True:
        drawn = _draw_scene(rng)
        if is_held_out(drawn) == (split == "test"):
            return drawn


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene, template: str) -> str:
    """The caption of ``scene`` written with one of `TEMPLATES`."""
    shapes = scene.shapes
    if template == "positions":
        return _join([f"{s.noun_phrase} at the {s.position}" for s in shapes])
    if template == "relation":
        if len(shapes) == 1:
            return f"{shapes[0].noun_phrase} at the {shapes[0].position}"
        a, b = shapes[0], shapes[1]
        relation = "above" if a.row < b.row else "left of"
        text = f"{a.noun_phrase} {relation} {b.noun_phrase}"
        if len(shapes) == 3:
            text += f" and {shapes[2].noun_phrase} at the {shapes[2].position}"
        return text
    if template == "count":
        noun = "shape" if len(shapes) == 1 else "shapes"
        phrases = _join([s.noun_phrase for s in shapes])
        return f"{COUNTS[len(shapes) - 1]} {noun} on a {scene.background} background: {phrases}"
    raise ConfigError(f"unknown caption template {template!r}; choose one of {', '.join(TEMPLATES)}")


def captions(scene: Scene) -> list[str]:
    """One caption per template, in the order of `TEMPLATES`."""
    return [caption(scene, t) for t in TEMPLATES]


def render(scene: Scene, size: int = IMAGE_SIZE):
    """The scene as an RGB `PIL.Image.Image` of ``size`` pixels (drawn 4x larger, then downsampled)."""
    from PIL import Image, ImageDraw

    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        cx, cy, r = (s.col + 0.5) / 3 * big, (s.row + 0.5) / 3 * big, RADIUS * big
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif s.kind == "square":
            q = r * 0.85
            draw.rectangle((cx - q, cy - q, cx + q, cy + q), fill=fill)
        elif s.kind == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
        else:
            w = r * 0.38
            draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
            draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def caption_corpus(n: int = 3000) -> list[str]:
    """Captions of the first ``n`` train scenes, every template (what the toy tokenizers learn from)."""
    return list(_corpus(n))


@cache
def _corpus(n: int) -> tuple[str, ...]:
    return tuple(c for i in range(n) for c in captions(scene("train", i)))


def make_shapes(folder: str | Path, n: int = 32, *, split: str = "test", start: int = 0) -> Path:
    """Write scenes ``start .. start + n - 1`` of ``split`` as PNGs plus ``manifest.jsonl``; return the manifest.

    Images already present are kept (they are a pure function of their name). The manifest is
    written last, so a folder with a manifest is complete.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(start, start + n):
        drawn = scene(split, i)
        image_id = f"shapes-{split}-{i:06d}"
        rel = f"images/{image_id}.png"
        target = folder / rel
        if not target.exists():
            tmp = target.with_suffix(".tmp.png")
            render(drawn).save(tmp)
            tmp.replace(target)
        lines.append(json.dumps({"id": image_id, "image": rel, "captions": captions(drawn)}))
    manifest = folder / "manifest.jsonl"
    tmp = manifest.with_suffix(".jsonl.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(manifest)
    return manifest
