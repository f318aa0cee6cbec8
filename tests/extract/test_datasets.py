"""Data sets of the study: COCO (Karpathy split) and Winoground, read from their real formats."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vislens.errors import ConfigError, DataError
from vislens.extract import ExtractConfig, extract
from vislens.extract.datasets import load_data
from vislens.store import open_store
from vislens.toys import ToySpec, build_toy_model

FIXTURES = Path(__file__).parent.parent / "fixtures"
COCO = FIXTURES / "dataset_coco.json"
WINOGROUND = FIXTURES / "winoground"

# what the fixture holds, written out by hand (ids in file order per split)
COCO_SPLIT_IDS = {
    "test": ["391895", "184613", "397133"],
    "val": ["522418"],
    "restval": ["318219"],
    "train": ["554625"],
    "all": ["391895", "522418", "184613", "318219", "554625", "397133"],
}


def _coco_entries() -> dict[str, dict]:
    return {str(e["cocoid"]): e for e in json.loads(COCO.read_text())["images"]}


def _picture(seed: int, size: tuple[int, int] = (40, 32)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def _image_bytes(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _write_coco_images(root: Path, ids: list[str]) -> None:
    entries = _coco_entries()
    for k, image_id in enumerate(ids):
        target = root / entries[image_id]["filepath"] / entries[image_id]["filename"]
        target.parent.mkdir(parents=True, exist_ok=True)
        _picture(k).save(target, format="JPEG")


# ---------------------------------------------------------------- COCO


@pytest.mark.parametrize("split", list(COCO_SPLIT_IDS))
def test_coco_split_filtering(tmp_path, split):
    data = load_data(f"coco:{COCO}", images=str(tmp_path), split=split)
    assert [r.id for r in data.records] == COCO_SPLIT_IDS[split]
    assert (data.name, data.split, data.source) == ("coco", split, str(COCO.resolve()))


def test_coco_captions_paths_and_ids(tmp_path):
    data = load_data(f"coco:{COCO}", images=str(tmp_path))  # default split: test
    entries = _coco_entries()
    by_id = {r.id: r for r in data.records}
    # captions are the stripped raw texts, in order, all of them (six for 184613)
    assert by_id["391895"].captions[0] == "A man with a red helmet on a small moped on a dirt road."
    assert len(by_id["184613"].captions) == 6
    assert by_id["184613"].captions[-1] == "A small child with an umbrella stands beside a large brown cow."
    for image_id, record in by_id.items():
        entry = entries[image_id]
        assert record.captions == tuple(s["raw"].strip() for s in entry["sentences"])
        assert record.image == str(tmp_path.resolve() / "val2014" / entry["filename"])
    # the train image lives in train2014/
    train = load_data(f"coco:{COCO}", images=str(tmp_path), split="train").records[0]
    assert train.image == str(tmp_path.resolve() / "train2014" / "COCO_train2014_000000554625.jpg")


def test_coco_id_falls_back_to_imgid_and_images_are_not_checked(tmp_path):
    doc = json.loads(COCO.read_text())
    for entry in doc["images"]:
        del entry["cocoid"]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(doc))
    data = load_data(f"coco:{path}", images=str(tmp_path), split="test")
    assert [r.id for r in data.records] == ["0", "2", "5"]
    assert not any(Path(r.image).exists() for r in data.records)  # paths only; extraction skips missing ones


def test_coco_limit_without_and_with_seed(tmp_path):
    spec, images = f"coco:{COCO}", str(tmp_path)
    first = load_data(spec, images=images, split="all", limit=4)
    assert [r.id for r in first.records] == COCO_SPLIT_IDS["all"][:4]
    draws = [load_data(spec, images=images, split="all", limit=3, seed=seed) for seed in range(6)]
    again = load_data(spec, images=images, split="all", limit=3, seed=0)
    assert again.records == draws[0].records and again.seed == 0
    order = COCO_SPLIT_IDS["all"]
    for draw in draws:
        ids = [r.id for r in draw.records]
        assert len(ids) == 3 and set(ids) <= set(order)
        assert ids == sorted(ids, key=order.index)  # data order
    assert len({tuple(r.id for r in d.records) for d in draws}) > 1  # the seed matters
    test_only = load_data(spec, images=images, split="test", limit=2, seed=1)
    assert {r.id for r in test_only.records} <= set(COCO_SPLIT_IDS["test"])


def _write_json(tmp_path: Path, doc) -> Path:
    path = tmp_path / "dataset_coco.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def _without(key: str, where: str = "entry") -> dict:
    doc = json.loads(COCO.read_text())
    target = doc["images"][0] if where == "entry" else doc["images"][0]["sentences"][1]
    del target[key]
    return doc


@pytest.mark.parametrize(
    "doc, message",
    [
        ('{"images": [', "not valid JSON"),
        ("[1, 2]", "expected one JSON object"),
        ({"dataset": "coco"}, 'missing key "images"'),
        (_without("split"), 'images[0]: missing "split" (one of train, val, test, restval)'),
        (_without("filename"), 'images[0]: missing "filename"'),
        (_without("sentences"), 'images[0]: missing "sentences"'),
        (_without("raw", where="sentence"), 'images[0].sentences[1]: missing "raw"'),
        ({"images": [{"split": "train"}]}, "COCO split 'test'"),
    ],
)
def test_coco_malformed_file(tmp_path, doc, message):
    path = _write_json(tmp_path, doc)
    with pytest.raises(DataError) as info:
        load_data(f"coco:{path}", images=str(tmp_path))
    assert message in str(info.value)


def test_coco_errors_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="needs the image root: add --images DIR"):
        load_data(f"coco:{COCO}")
    with pytest.raises(DataError, match="is not a folder"):
        load_data(f"coco:{COCO}", images=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="does not exist; pass coco:PATH with PATH the Karpathy split file"):
        load_data(f"coco:{tmp_path / 'missing.json'}", images=str(tmp_path))
    with pytest.raises(DataError, match="unknown COCO split 'testing'"):
        load_data(f"coco:{COCO}", images=str(tmp_path), split="testing")
    doc = json.loads(COCO.read_text())
    doc["images"] = [e for e in doc["images"] if e["split"] != "val"]
    with pytest.raises(DataError, match=r"split 'val' of .* holds no images \(found restval: 1, test: 3, train: 1\)"):
        load_data(f"coco:{_write_json(tmp_path, doc)}", images=str(tmp_path), split="val")


def test_images_option_only_for_data_sets_that_use_it(manifest, tmp_path):
    with pytest.raises(ConfigError, match="applies only to coco: and winoground:"):
        load_data(str(manifest), images=str(tmp_path))
    with pytest.raises(DataError, match="unknown data spec 'cocoa:x.json'"):
        load_data("cocoa:x.json")


# ---------------------------------------------------------------- Winoground


def _winoground_items() -> list[dict]:
    return [json.loads(line) for line in (WINOGROUND / "examples.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("target", ["folder", "file"])
def test_winoground_two_records_per_item(target):
    path = WINOGROUND if target == "folder" else WINOGROUND / "examples.jsonl"
    data = load_data(f"winoground:{path}")
    assert (data.name, data.split, data.source) == ("winoground", "test", str(path.resolve()))
    items = _winoground_items()
    assert len(data.records) == 2 * len(items)
    for item, pair in zip(items, zip(data.records[0::2], data.records[1::2], strict=True), strict=True):
        for k, record in enumerate(pair):
            assert record.id == item[f"image_{k}"] == f"ex_{item['id']}_img_{k}"
            assert record.captions == (item[f"caption_{k}"],)
            assert record.image == str((WINOGROUND / "images" / f"ex_{item['id']}_img_{k}.png").resolve())
    assert data.records[0].captions == ("an old person kisses a young person",)
    assert data.records[1].captions == ("a young person kisses an old person",)


def test_winoground_limit_keeps_pairs_and_images_override(tmp_path):
    data = load_data(f"winoground:{WINOGROUND}", limit=2, seed=5, images=str(tmp_path))
    ids = [r.id for r in data.records]
    assert len(ids) == 4
    for first, second in zip(ids[0::2], ids[1::2], strict=True):
        assert first.endswith("_img_0") and second == first.replace("_img_0", "_img_1")
    assert all(Path(r.image).parent == tmp_path.resolve() for r in data.records)
    assert [r.id for r in load_data(f"winoground:{WINOGROUND}", limit=1).records] == ["ex_0_img_0", "ex_0_img_1"]


def test_winoground_errors(tmp_path):
    with pytest.raises(DataError, match="holds neither examples.jsonl nor \\*.parquet"):
        load_data(f"winoground:{tmp_path}")
    with pytest.raises(DataError, match="does not exist; pass the folder holding examples.jsonl"):
        load_data(f"winoground:{tmp_path / 'nowhere'}")
    items = _winoground_items()
    del items[1]["caption_1"]
    (tmp_path / "examples.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    with pytest.raises(
        DataError, match='examples.jsonl:2: missing "caption_1" \\(a non-empty string\\), found nothing'
    ):
        load_data(f"winoground:{tmp_path}")
    items[1]["caption_1"] = "x"
    items[2]["image_0"] = "ex_0_img_0"
    (tmp_path / "examples.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    with pytest.raises(DataError, match="image id ex_0_img_0 appears twice"):
        load_data(f"winoground:{tmp_path}")


def _write_parquet(path: Path, images: dict[str, bytes], drop: str | None = None) -> None:
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    items = _winoground_items()
    columns = {
        "id": pa.array([i["id"] for i in items], pa.int32()),
        "image_0": pa.array([{"bytes": images[i["image_0"]], "path": None} for i in items], struct),
        "image_1": pa.array([{"bytes": images[i["image_1"]], "path": f"{i['image_1']}.jpg"} for i in items], struct),
        "caption_0": pa.array([i["caption_0"] for i in items]),
        "caption_1": pa.array([i["caption_1"] for i in items]),
        "tag": pa.array([i["tag"] for i in items]),
        "secondary_tag": pa.array([i["secondary_tag"] for i in items]),
        "num_main_preds": pa.array([i["num_main_preds"] for i in items], pa.int32()),
        "collapsed_tag": pa.array([i["collapsed_tag"] for i in items]),
    }
    if drop:
        del columns[drop]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def test_winoground_parquet_export_round_trip(tmp_path):
    images = {}
    for n, item in enumerate(_winoground_items()):
        images[item["image_0"]] = _image_bytes(_picture(2 * n), "PNG")
        images[item["image_1"]] = _image_bytes(_picture(2 * n + 1), "JPEG")
    parquet = tmp_path / "export" / "data" / "test-00000-of-00001.parquet"
    _write_parquet(parquet, images)
    cache = tmp_path / "cache"
    reference = load_data(f"winoground:{WINOGROUND}")
    for spec in (parquet, tmp_path / "export"):  # the file, or a folder holding it
        data = load_data(f"winoground:{spec}", cache_dir=cache)
        assert (data.name, data.source) == ("winoground", str(spec.resolve()))
        assert [(r.id, r.captions) for r in data.records] == [(r.id, r.captions) for r in reference.records]
        for record in data.records:
            path = Path(record.image)
            assert path.parent.parent == cache / "winoground-images"
            assert path.suffix == (".png" if record.id.endswith("_img_0") else ".jpg")
            assert path.read_bytes() == images[record.id]
    stamps = {r.image: Path(r.image).stat().st_mtime_ns for r in data.records}
    again = load_data(f"winoground:{parquet}", cache_dir=cache, limit=1)
    assert [r.id for r in again.records] == ["ex_0_img_0", "ex_0_img_1"]
    assert all(Path(image).stat().st_mtime_ns == stamp for image, stamp in stamps.items())  # cached, not rewritten


def test_winoground_parquet_errors(tmp_path, monkeypatch):
    images = {f"ex_{i}_img_{k}": _image_bytes(_picture(i), "PNG") for i in range(3) for k in (0, 1)}
    parquet = tmp_path / "bad" / "winoground.parquet"
    _write_parquet(parquet, images, drop="caption_0")
    with pytest.raises(DataError, match="missing column\\(s\\) caption_0; expected the Winoground export"):
        load_data(f"winoground:{parquet}", cache_dir=tmp_path / "cache")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    with pytest.raises(DataError, match="needs pyarrow .*pip install pyarrow"):
        load_data(f"winoground:{parquet.parent}", cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------- end to end


def test_extract_coco_end_to_end(tmp_path):
    model = build_toy_model(tmp_path / "m", ToySpec(layers=2))
    images = tmp_path / "coco"
    _write_coco_images(images, COCO_SPLIT_IDS["test"])
    shutil.copy(COCO, tmp_path / "dataset_coco.json")
    config = ExtractConfig(
        model=str(model),
        data=f"coco:{tmp_path / 'dataset_coco.json'}",
        images=str(images),
        split="test",
        out=str(tmp_path / "s.zarr"),
        attention="none",
        progress=False,
    )
    result = extract(config)
    assert result.written == 3 and not result.skipped
    tree = open_store(str(tmp_path / "s.zarr"))
    assert [str(v) for v in tree["activations"].image_id.values] == COCO_SPLIT_IDS["test"]
    captions = tree["captions"].to_dataset().load()
    entries = _coco_entries()
    assert [str(v) for v in captions.image_id.values] == COCO_SPLIT_IDS["test"]
    assert captions.text.dims == ("image", "caption") and captions.sizes["caption"] == 6
    for row, image_id in enumerate(COCO_SPLIT_IDS["test"]):
        expected = [s["raw"].strip() for s in entries[image_id]["sentences"]]
        assert int(captions.n_captions[row]) == len(expected)
        assert [str(t) for t in captions.text[row].values] == expected + [""] * (6 - len(expected))
    assert tree.attrs["dataset"]["name"] == "coco" and tree.attrs["dataset"]["split"] == "test"


def test_cli_passes_images_and_split(monkeypatch, tmp_path, capsys):
    import vislens.extract
    from vislens.cli import main

    seen = {}

    def fake_extract(config):
        seen["config"] = config
        raise DataError("stop here")

    monkeypatch.setattr(vislens.extract, "extract", fake_extract)
    argv = ["extract", "--model", "m", "--data", f"coco:{COCO}", "--out", str(tmp_path / "s.zarr")]
    assert main([*argv, "--images", str(tmp_path), "--split", "val"]) == 2
    assert (seen["config"].images, seen["config"].split) == (str(tmp_path), "val")
    assert main(argv) == 2
    assert (seen["config"].images, seen["config"].split) == (None, "test")
    monkeypatch.undo()
    assert main(argv) == 2  # the real extraction: no --images for a coco: spec
    assert "add --images DIR" in capsys.readouterr().err
