"""CLI smoke: ``vislens ablate`` then ``vislens analyze ablation``, through the modules' add_* functions."""

from __future__ import annotations

import argparse

import pytest
import xarray as xr

from vislens.cli.ablate import add_ablate, add_ablation_analysis


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vislens")
    sub = parser.add_subparsers(dest="command", required=True)
    add_ablate(sub)
    analyze = sub.add_parser("analyze").add_subparsers(dest="analysis", required=True)
    add_ablation_analysis(analyze)
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


def test_ablate_then_analyze(toy_models, manifest, tmp_path, capsys):
    store, out = str(tmp_path / "a.zarr"), tmp_path / "report"
    common = ["--model", str(toy_models["mha"]), "--data", str(manifest), "--out", store, "--limit", "2"]
    assert _run(["ablate", *common, "--ks", "1-3,25", "--no-progress"]) == 0
    assert "10 (image, prompt) pairs x 4 settings" in capsys.readouterr().out
    mask = ["--mode", "mask", "--intervals", "0:5,5:25", "--mask-style", "remove", "--group", "masked"]
    assert _run(["ablate", *common, *mask, "--token-loss", "none", "--no-progress"]) == 0
    masked = xr.open_zarr(store, group="masked")
    assert "token_loss" not in masked and masked["masked_loss"].shape == (2, 5, 2)
    assert _run(["analyze", "ablation", store, "--out", str(out)]) == 0
    assert _run(["analyze", "ablation", store, "--out", str(out), "--group", "masked"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"ablation_truncation.png", "ablation_summary.csv", "ablation_masking.csv", "ablation_masking.png"} <= names


def test_bad_arguments_are_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["ablate", "--model", "m", "--data", "d", "--out", "o", "--ks", "1-x"])
    assert "ranges like 1-32,64,576" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parser().parse_args(["ablate", "--model", "m", "--data", "d", "--out", "o", "--mode", "prune"])
    assert "invalid choice" in capsys.readouterr().err
