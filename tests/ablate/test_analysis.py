"""Summaries of an ablation group, on hand-built Datasets with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from vislens.analyze.ablation import (
    masking_table,
    reduction_curve,
    threshold,
    tokens_for_reduction,
    truncation_curve,
    write_ablation,
    write_ablation_report,
)
from vislens.errors import StoreFormatError
from vislens.store import DONE, PENDING

# mean loss over samples per prompt and k (k = 2, 4, 6, 8, 10 of n = 20 image tokens)
CURVES = np.array([[10.0, 8.0, 6.0, 5.0, 4.0], [6.0, 4.0, 3.0, 3.0, 2.0]])
FULL = np.array([4.0, 2.0])


def truncation_group() -> xr.Dataset:
    """3 samples: two done (curve -1, curve +1), one pending full of nonsense."""
    loss = np.stack([CURVES - 1, CURVES + 1, np.full_like(CURVES, 1e6)])
    full = np.stack([FULL - 1, FULL + 1, [1e6, 1e6]])
    done = np.array([[DONE, DONE], [DONE, DONE], [PENDING, PENDING]], dtype=np.uint8)
    return xr.Dataset(
        {
            "loss": (("sample", "prompt", "k"), loss.astype(np.float32)),
            "full_loss": (("sample", "prompt"), full.astype(np.float32)),
            "done": (("sample", "prompt"), done),
        },
        coords={"k": [2, 4, 6, 8, 10], "prompt_id": ("prompt", ["a", "b"])},
        attrs={"mode": "truncate", "n_image_tokens": 20},
    )


def test_curve_and_threshold_use_only_finished_pairs():
    ds = truncation_group()
    curve = truncation_curve(ds)
    np.testing.assert_allclose(curve["mean_loss"].to_numpy().reshape(2, 5), CURVES)
    assert (curve["n_samples"] == 2).all()
    np.testing.assert_allclose(curve["fraction"][:5], [0.1, 0.2, 0.3, 0.4, 0.5])
    assert threshold(ds) == pytest.approx(CURVES.mean())  # (6.6 + 3.6) / 2 = 5.1


def test_smallest_fraction_reaching_seventy_percent_of_the_reduction():
    ds = truncation_group()
    # prompt a: L(2) - L_full = 6; reduction [0, 1/3, 2/3, 5/6, 1] -> first >= 0.7 at k = 8
    # prompt b: 4; [0, 1/2, 3/4, 3/4, 1] -> k = 6
    # pooled: curve [8, 6, 4.5, 4, 3], full 3, total 5; [0, .4, .7, .8, 1] -> k = 6 (0.7 reached exactly)
    table = tokens_for_reduction(ds).set_index("prompt_id")
    assert table.loc["a", "k"] == 8 and table.loc["a", "fraction"] == pytest.approx(0.4)
    assert table.loc["b", "k"] == 6 and table.loc["all", "k"] == 6
    assert table.loc["all", "fraction"] == pytest.approx(0.3)
    assert table.loc["all", "total_reduction"] == pytest.approx(5.0)
    curve = reduction_curve(ds)
    np.testing.assert_allclose(curve[curve.prompt_id == "all"]["reduction"], [0, 0.4, 0.7, 0.8, 1.0])
    assert tokens_for_reduction(ds, target=0.9).set_index("prompt_id").loc["b", "k"] == 10


def test_no_reduction_gives_no_fraction():
    ds = truncation_group()
    ds["full_loss"] = ds["full_loss"] + 100  # the loss never falls to the full-input loss
    table = tokens_for_reduction(ds)
    assert table["k"].isna().all() and table["fraction"].isna().all()


def test_masking_table_per_interval():
    masked = np.array([[[3.0, 5.0, 4.0]], [[5.0, 7.0, 4.0]]])  # (sample, prompt, setting)
    ds = xr.Dataset(
        {
            "masked_loss": (("sample", "prompt", "setting"), masked),
            "full_loss": (("sample", "prompt"), np.array([[4.0], [6.0]])),
            "done": (("sample", "prompt"), np.full((2, 1), DONE, dtype=np.uint8)),
        },
        coords={"start": ("setting", [0, 8, 16]), "stop": ("setting", [8, 16, 24]), "prompt_id": ("prompt", ["p"])},
        attrs={"mode": "mask", "n_image_tokens": 24},
    )
    table = masking_table(ds)
    pooled = table[table.prompt_id == "all"]
    np.testing.assert_allclose(pooled["masked_loss"], [4.0, 6.0, 4.0])
    np.testing.assert_allclose(pooled["delta"], [-1.0, 1.0, -1.0])  # masking tokens 0-8 and 16-24 helps
    assert list(pooled["stop"]) == [8, 16, 24]
    with pytest.raises(StoreFormatError, match="mode 'mask'"):
        truncation_curve(ds)


def test_report_files(tmp_path):
    written = write_ablation_report(truncation_group(), tmp_path)
    assert {p.name for p in written.values()} == {
        "ablation_truncation.csv",
        "ablation_reduction.csv",
        "ablation_summary.csv",
        "ablation_truncation.png",
        "ablation_reduction.png",
    }
    assert all(p.stat().st_size > 0 for p in written.values())
    assert "threshold" in (tmp_path / "ablation_summary.csv").read_text().splitlines()[0]


def test_nothing_finished_is_an_error():
    ds = truncation_group()
    ds["done"][:] = PENDING
    with pytest.raises(StoreFormatError, match="no finished pairs"):
        threshold(ds)


def test_reports_of_several_stores_go_to_their_own_folders(tmp_path):
    written = write_ablation([truncation_group(), truncation_group()], tmp_path)
    assert len(written) == 10 and all(name.endswith((".csv", ".png")) for name in written)
    assert {p.parent.name for p in written.values()} == {"0-store", "1-store"}
