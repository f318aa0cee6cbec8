"""The command line: help for every command, the demo end to end, and README/CI agreement."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import xarray as xr

from vislens.cli import main

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = [
    ["extract"],
    ["analyze"],
    ["analyze", "cosine"],
    ["analyze", "logit-lens"],
    ["analyze", "norm-attention"],
    ["report"],
    ["info"],
    ["verify"],
    ["demo"],
    ["toy"],
    ["toy", "train"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: vislens " + " ".join(command))
    assert len(text) > 150


def test_errors_are_one_line_without_traceback(tmp_path, capsys):
    code = main(["info", str(tmp_path / "nothing.zarr")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("vislens info: error: no zarr v3 store") and "Traceback" not in err


def test_output_cut_short_by_a_pipe_is_no_error():
    """`vislens info STORE | head` ends quietly, without a traceback."""
    code = (
        "import sys\n"
        "from vislens.cli import main, store\n"
        "store._cmd_info = lambda args: [print('x' * 99) for _ in range(20_000)]\n"
        "sys.exit(main(['info', 'any.zarr']))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(100) == b"x" * 99 + b"\n"
    proc.stdout.close()  # as `head` does
    err = proc.stderr.read().decode()
    assert proc.wait() == 1
    assert "Traceback" not in err and "Broken pipe" not in err


def test_demo_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("VISLENS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "vislens", "demo", "--out", str(out), "--n", "4", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("12 samples written") == 2 and "demo finished" in proc.stdout
    for name, model_type in (("store.zarr", "llava"), ("instructblip.zarr", "instructblip")):
        tree = xr.open_datatree(out / name, engine="zarr")
        assert model_type in str(tree.attrs["model"]).lower()
        assert {"activations", "ablation"} <= set(tree.children)
    acts = xr.open_zarr(out / "store.zarr", group="activations")
    assert acts["hidden"].dims == ("sample", "layer", "token", "d_model")
    table = pd.read_csv(out / "cosine.csv")
    assert {"layer", "inter_modal", "prompt_kind"} <= set(table.columns)
    assert sorted(table.prompt_kind.unique()) == ["empty", "noisy", "normal"]
    assert table.store.nunique() == 2
    assert (out / "cosine.png").stat().st_size > 10_000
    page = (out / "report" / "index.html").read_text()
    for figure in ("logit_lens.png", "cosine.png", "norm_attention.png", "ablation_truncation.png"):
        assert figure in page
    lens = pd.read_csv(out / "report" / "logit_lens" / "logit_lens.csv")
    llava = lens[lens.store.str.endswith("store.zarr") & (lens.prompt_kind == "normal")].set_index("layer").recall
    assert llava.max() >= max(2 * llava[0], 0.2), llava  # the trained toy: recall rises with depth
    rerun = subprocess.run(
        [sys.executable, "-m", "vislens", "demo", "--out", str(out), "--n", "4", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rerun.stdout.count("0 samples written") == 2 and rerun.stdout.count("12 already done") == 2


def test_readme_has_the_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", setup, flags=re.S)
    assert len(commands) == 2
    assert "vislens demo" in commands[0] and "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert commands[1].endswith(ci[-1])  # CI runs the README's test command (after activating its venv)
    assert "pip install torch==2.13.0" in commands[0] and "python -m pip install --quiet torch==2.13.0" in ci
