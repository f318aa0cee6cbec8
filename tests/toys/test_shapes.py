"""The shapes world: deterministic scenes, disjoint splits, captions that say what is drawn."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from vislens.errors import ConfigError
from vislens.extract.datasets import load_data, read_manifest
from vislens.toys.shapes import (
    BACKGROUNDS,
    COLOURS,
    COUNTS,
    IMAGE_SIZE,
    TEMPLATES,
    captions,
    is_held_out,
    make_shapes,
    render,
    scene,
)


def test_a_scene_is_a_pure_function_of_split_and_index():
    a, b = scene("train", 17), scene("train", 17)
    assert a == b
    assert render(a).tobytes() == render(b).tobytes()
    assert scene("train", 17) != scene("train", 18)
    assert scene("test", 17) != scene("train", 17)


def test_the_splits_are_disjoint_layouts():
    train = [scene("train", i) for i in range(400)]
    test = [scene("test", i) for i in range(100)]
    assert not any(is_held_out(s) for s in train)
    assert all(is_held_out(s) for s in test)
    assert not {s.key for s in train} & {s.key for s in test}
    assert {len(s.shapes) for s in train} == {1, 2, 3}


def test_captions_name_every_shape_and_where_it_is():
    drawn = scene("test", 3)
    texts = captions(drawn)
    assert len(texts) == len(TEMPLATES)
    positions, relation, count = texts
    for shape in drawn.shapes:
        assert f"{shape.colour} {shape.kind} at the {shape.position}" in positions
        assert f"{shape.colour} {shape.kind}" in count
    assert f"on a {drawn.background} background" in count
    assert relation.startswith(drawn.shapes[0].noun_phrase)


def test_the_image_shows_the_colours_of_the_caption():
    drawn = scene("test", 5)
    pixels = np.asarray(render(drawn)).reshape(-1, 3).astype(int)
    assert render(drawn).size == (IMAGE_SIZE, IMAGE_SIZE)
    for shape in drawn.shapes:
        cell = np.asarray(render(drawn))[
            shape.row * IMAGE_SIZE // 3 : (shape.row + 1) * IMAGE_SIZE // 3,
            shape.col * IMAGE_SIZE // 3 : (shape.col + 1) * IMAGE_SIZE // 3,
        ].reshape(-1, 3)
        distance = np.abs(cell.astype(int) - np.array(COLOURS[shape.colour])).sum(-1)
        assert (distance < 30).sum() > 10, shape
    background = np.abs(pixels - np.array(BACKGROUNDS[drawn.background])).sum(-1)
    assert (background < 10).mean() > 0.5


def test_make_shapes_writes_a_manifest_every_command_reads(tmp_path):
    manifest = make_shapes(tmp_path / "a", 5, split="test", start=2)
    records = read_manifest(manifest)
    assert [r.id for r in records] == [f"shapes-test-{i:06d}" for i in range(2, 7)]
    assert records[0].captions == tuple(captions(scene("test", 2)))
    again = make_shapes(tmp_path / "b", 5, split="test", start=2)
    digest = [hashlib.sha256(open(r.image, "rb").read()).hexdigest() for r in read_manifest(again)]
    assert digest == [hashlib.sha256(open(r.image, "rb").read()).hexdigest() for r in records]


def test_synthetic_spec_is_the_held_out_split(tmp_path):
    data = load_data("synthetic:3", cache_dir=tmp_path)
    assert [r.captions for r in data.records] == [tuple(captions(scene("test", i))) for i in range(3)]


def test_unknown_split_is_named():
    with pytest.raises(ConfigError, match="unknown shapes-world split 'val'"):
        scene("val", 0)


def _phrases(text: str) -> list[str]:
    """The parts of a list written by the captions ("a, b and c")."""
    head, _, last = text.rpartition(" and ")
    return (head.split(", ") if head else []) + [last]


def test_every_scene_keeps_its_invariants():
    """Over many scenes of both splits: one to three shapes, each in its own cell, in reading
    order; the positions caption names exactly the drawn shapes at their cells, the count caption
    the right number, and the relation caption a relation that holds on the grid."""
    scenes = [scene("train", i) for i in range(1500)] + [scene("test", i) for i in range(300)]
    for drawn in scenes:
        cells = [(s.row, s.col) for s in drawn.shapes]
        assert 1 <= len(cells) <= 3
        assert len(set(cells)) == len(cells), f"two shapes share a cell: {drawn}"
        assert cells == sorted(cells)
        positions, relation, count = captions(drawn)
        assert _phrases(positions) == [f"{s.noun_phrase} at the {s.position}" for s in drawn.shapes]
        assert count.split()[0] == COUNTS[len(cells) - 1]
        assert _phrases(count.split(": ", 1)[1]) == [s.noun_phrase for s in drawn.shapes]
        if len(cells) > 1:
            (r0, c0), (r1, c1) = cells[:2]
            said = "above" if f"{drawn.shapes[0].noun_phrase} above " in relation else "left of"
            assert f"{drawn.shapes[0].noun_phrase} {said} {drawn.shapes[1].noun_phrase}" in relation
            assert (r0 < r1) if said == "above" else (r0 == r1 and c0 < c1)
