"""A deterministic synthetic image-caption data set: coloured shapes with template captions.

``make_synthetic(folder, n, seed)`` draws PNG images and writes a vislens manifest beside
them; the same (n, seed) always gives the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
TEMPLATES = (
    "a {size} {colour} {shape} on a {background} background",
    "a {colour} {shape} in front of a {background} wall",
    "an image of one {colour} {shape}",
)
IMAGE_SIZE = 64


def caption_corpus() -> list[str]:
    """Every caption the generator can write (the toy tokenizer is trained on them)."""
    out = []
    for template in TEMPLATES:
        for size in SIZES:
            for colour in COLOURS:
                for shape in SHAPES:
                    for background in COLOURS:
                        if background != colour:
                            out.append(template.format(size=size, colour=colour, shape=shape, background=background))
    return sorted(set(out))


def _draw(shape: str, colour: str, background: str, size: str, offset: tuple[int, int]):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), COLOURS[background])
    draw = ImageDraw.Draw(img)
    radius = 12 if size == "small" else 24
    cx, cy = IMAGE_SIZE // 2 + offset[0], IMAGE_SIZE // 2 + offset[1]
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    else:
        draw.polygon([(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)], fill=fill)
    return img


def make_synthetic(folder: str | Path, n: int = 32, seed: int = 0) -> Path:
    """Write ``n`` images and ``manifest.jsonl`` into ``folder``; return the manifest path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.jsonl"
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    lines = []
    for i in range(n):
        colour, background = rng.choice(names, size=2, replace=False)
        shape = SHAPES[rng.integers(len(SHAPES))]
        size = SIZES[rng.integers(len(SIZES))]
        offset = tuple(int(v) for v in rng.integers(-6, 7, size=2))
        image_id = f"shape-{i:05d}"
        rel = f"images/{image_id}.png"
        target = folder / rel
        if not target.exists():
            _draw(shape, str(colour), str(background), size, offset).save(target)
        words = dict(size=size, colour=colour, shape=shape, background=background)
        captions = [t.format(**words) for t in TEMPLATES]
        lines.append(json.dumps({"id": image_id, "image": rel, "captions": captions}))
    manifest.write_text("\n".join(lines) + "\n")
    return manifest
