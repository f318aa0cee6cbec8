"""info and verify: sizes and ratios, and every kind of damage named by array and chunk."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from vislens.cli import main
from vislens.errors import StoreFormatError
from vislens.store.inspect import info, verify


def test_info_counts_samples_and_compression(store_path):
    report = info(str(store_path))
    assert report["samples"] == {"total": 12, "done": 12, "skipped": 0, "pending": 0}
    assert report["groups"] == ["activations", "attention", "captions", "lens", "results"]
    hidden = next(v for v in report["variables"] if v.path == "activations/hidden")
    assert hidden.files == 12  # one shard per sample
    assert hidden.logical_bytes == int(np.prod(hidden.shape)) * 2
    assert hidden.ratio > 1.0
    assert report["model"]["n_kv_heads"] == 2


def test_info_cli_prints_table_and_json(store_path, capsys):
    assert main(["info", str(store_path)]) == 0
    text = capsys.readouterr().out
    assert "12 done / 12 total" in text and "activations/hidden" in text
    assert main(["info", str(store_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"]["done"] == 12


def test_verify_passes_a_sound_store(store_path, capsys):
    assert verify(str(store_path)) == []
    assert main(["verify", str(store_path), "--no-progress"]) == 0


def _flip_byte(path, offset=20):
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_names_a_corrupted_chunk(store_copy, capsys):
    _flip_byte(store_copy / "activations/hidden/c/4/0/0/0")
    problems = verify(str(store_copy))
    assert [(p.array, p.chunk) for p in problems] == [("activations/hidden", "activations/hidden/c/4/0/0/0")]
    assert "checksum" in problems[0].message
    assert main(["verify", str(store_copy), "--no-progress"]) == 1
    assert "activations/hidden chunk activations/hidden/c/4/0/0/0" in capsys.readouterr().err


def test_verify_names_a_truncated_chunk(store_copy):
    path = store_copy / "attention/value_gram/c/2/0/0/0/0"
    path.write_bytes(path.read_bytes()[:100])
    problems = verify(str(store_copy))
    assert [p.chunk for p in problems] == ["attention/value_gram/c/2/0/0/0/0"]


def test_verify_finds_a_done_sample_without_data(store_copy):
    (store_copy / "activations/hidden/c/7/0/0/0").unlink()
    problems = verify(str(store_copy))
    assert len(problems) == 1
    assert problems[0].array == "activations/hidden" and "sample 7 is marked done" in problems[0].message


def test_verify_reports_a_missing_array(store_copy):
    shutil.rmtree(store_copy / "activations/modality")
    problems = verify(str(store_copy))
    assert any(p.array == "activations/modality" and "missing" in p.message for p in problems)


def test_corrupt_metadata_is_a_format_error(store_copy):
    (store_copy / "zarr.json").write_text("{ this is not json")
    with pytest.raises(StoreFormatError, match="not valid JSON"):
        verify(str(store_copy))
