"""What a researcher sees: partial stores said everywhere, stores told apart, result variables
named for what they hold, help that reads well, one-line errors (through the real CLI)."""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import zarr

from vislens.analyze import cosine_per_sample, logit_lens_per_sample, norm_attention_per_sample
from vislens.analyze.common import model_name, short_labels
from vislens.analyze.outputs import write_cosine, write_norm_attention
from vislens.analyze.report import write_report
from vislens.cli import build_parser
from vislens.errors import StoreIncompleteError
from vislens.store import PENDING, open_store


@pytest.fixture
def partial_store(analysis_stores, tmp_path):
    """A copy of an analysis store with 5 of its 18 samples set back to pending (an interrupted run)."""
    path = tmp_path / "partial.zarr"
    shutil.copytree(analysis_stores["gqa"], path)
    done = zarr.open_array(str(path / "activations" / "done"), mode="r+")
    done[13:] = PENDING
    return path


def test_a_partial_store_is_said_everywhere(partial_store, tmp_path, caplog):
    tree = open_store(str(partial_store))
    with caplog.at_level(logging.WARNING, logger="vislens.analyze"):
        written = write_cosine([tree], tmp_path / "out")
    assert "13 of 18 samples done" in caplog.text
    table = pd.read_csv(written["cosine.csv"])
    assert (table["samples_done"] == 13).all() and (table["samples_total"] == 18).all()
    with pytest.raises(StoreIncompleteError, match="13 of 18 samples done"):
        write_cosine([tree], tmp_path / "refused", require=True)
    assert not (tmp_path / "refused").exists()
    index = write_report([tree], tmp_path / "report", text_tokens="all")
    assert "13 of 18 done" in index.read_text()


def test_two_stores_with_the_same_folder_name_get_distinct_labels_and_files(analysis_stores, tmp_path):
    for name in ("run-a", "run-b"):
        shutil.copytree(analysis_stores["gqa"], tmp_path / name / "store.zarr")
    trees = [open_store(str(tmp_path / name / "store.zarr")) for name in ("run-a", "run-b")]
    written = write_norm_attention(trees, tmp_path / "out", samples=["0"], top=2)
    heatmaps = sorted(name for name in written if name.startswith("heatmap_"))
    assert len(heatmaps) == 2 and heatmaps[0] != heatmaps[1]
    assert all(written[name].exists() for name in heatmaps)
    table = pd.read_csv(written["norm_attention.csv"])
    assert table["series"].nunique() == 2
    assert short_labels(["/x/run-a/store.zarr", "/x/run-b/store.zarr", "/y/solo.zarr"]) == [
        "run-a/store.zarr",
        "run-b/store.zarr",
        "solo.zarr",
    ]


def test_model_names_are_short():
    import xarray as xr

    def tree(name):
        return xr.DataTree(xr.Dataset(attrs={"model": {"name_or_path": name}}))

    assert model_name(tree("llava-hf/llava-1.5-7b-hf")) == "llava-hf/llava-1.5-7b-hf"
    assert model_name(tree("/home/me/.cache/vislens/toy-llava-v2-xyz")) == "toy-llava-v2-xyz"


def test_result_variables_are_named_for_what_they_hold(analysis_stores):
    tree = open_store(analysis_stores["mha"])
    results = [
        cosine_per_sample(tree).compute(),
        logit_lens_per_sample(tree, cache=False),
        norm_attention_per_sample(tree).compute(),
    ]
    for ds in results:
        for name, var in ds.data_vars.items():
            text = var.attrs.get("long_name", "")
            assert text and "hidden state of the language decoder" not in text and "attention weights" not in text, name


def _helps(parser):
    yield parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action.choices.values():
                yield from _helps(choice)


def test_help_shows_real_defaults_only():
    for text in _helps(build_parser()):
        assert "(default: None)" not in text and "(default: False)" not in text
        assert "%%" not in text and "('" not in text


def test_a_file_given_as_a_store_is_one_line(tmp_path):
    path = tmp_path / "not-a-store.txt"
    path.write_text("hello")
    proc = subprocess.run(
        [sys.executable, "-m", "vislens", "info", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "is a file, not a store folder" in proc.stderr
