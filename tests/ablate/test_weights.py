"""Which weights the ablation summaries give samples and prompts, when the counts differ.

METHODS.md, analysis 4: the threshold is the mean loss over all settings of all prompts, each
setting's loss being the mean over the images (samples) first. With unequal counts (pairs not
done, settings beyond an image's own image tokens) the possible weightings give different
numbers; this known answer tells them apart:

    prompt a: one done sample        L_a(k) = [9, 6, 3]
    prompt b: three done samples     L_b(k) = [(3+5+1)/3, (2+4+0)/3, 1/1] = [3, 2, 1]
    threshold = mean_pk L_p(k) = 24 / 6 = 4.0
    mean over all done (pair, k) values            = 34 / 10 = 3.4
    mean over prompts of each prompt's pair mean   = (6 + 16/7) / 2 = 4.142857...
    mean over k of the mean over all pairs of k    = (4.5 + 3 + 2) / 3 = 3.1666...
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from vislens.analyze.ablation import masking_table, reduction_curve, threshold, truncation_curve, write_ablation_report
from vislens.store import DONE, PENDING, SKIPPED

NAN = np.nan
JUNK = 1e6  # the values of pairs that are not done


def unequal_group() -> xr.Dataset:
    loss = np.array(
        [
            [[9, 6, 3], [3, 2, 1]],
            [[JUNK, JUNK, JUNK], [5, 4, NAN]],  # sample 1 has 2 image tokens: k = 3 does not fit
            [[JUNK, JUNK, JUNK], [1, 0, NAN]],
        ],
        dtype=np.float32,
    )
    full = np.array([[2.0, 1.0], [JUNK, 1.0], [JUNK, 0.0]], dtype=np.float32)
    done = np.array([[DONE, DONE], [PENDING, DONE], [SKIPPED, DONE]], dtype=np.uint8)
    return xr.Dataset(
        {
            "loss": (("sample", "prompt", "k"), loss),
            "full_loss": (("sample", "prompt"), full),
            "done": (("sample", "prompt"), done),
        },
        coords={"k": [1, 2, 3], "prompt_id": ("prompt", ["a", "b"])},
        attrs={"mode": "truncate", "n_image_tokens": 3},
    )


def test_threshold_is_the_mean_over_samples_then_settings_and_prompts():
    assert threshold(unequal_group()) == pytest.approx(4.0)


def test_curves_average_samples_within_a_prompt_then_prompts():
    ds = unequal_group()
    curve = truncation_curve(ds)
    np.testing.assert_allclose(curve["mean_loss"].to_numpy().reshape(2, 3), [[9, 6, 3], [3, 2, 1]])
    np.testing.assert_array_equal(curve["n_samples"].to_numpy().reshape(2, 3), [[1, 1, 1], [3, 3, 1]])
    pooled = reduction_curve(ds).set_index(["prompt_id", "k"])
    # pooled L(k) = mean over prompts of L_p(k) = [6, 4, 2]; L_full = mean(2, 2/3) = 4/3
    np.testing.assert_allclose(pooled.loc["all"]["mean_loss"], [6, 4, 2])
    total = 6 - 4 / 3
    np.testing.assert_allclose(pooled.loc["all"]["reduction"], [0, 2 / total, 4 / total])
    np.testing.assert_allclose(pooled.loc["b"]["reduction"], [0, 1 / (3 - 2 / 3), 2 / (3 - 2 / 3)])


def test_the_reported_summary_holds_the_same_threshold(tmp_path):
    paths = write_ablation_report(unequal_group(), tmp_path)
    summary = pd.read_csv(paths["ablation_summary.csv"])
    assert summary["threshold"].iloc[0] == pytest.approx(4.0)
    assert summary.set_index("prompt_id").loc["all", "loss_full"] == pytest.approx(4 / 3)


def test_masking_table_with_unequal_counts():
    masked = np.array(
        [
            [[4, 8], [1, 3]],
            [[JUNK, JUNK], [3, NAN]],  # sample 1: the second interval does not fit its image
            [[JUNK, JUNK], [5, NAN]],
        ],
        dtype=np.float32,
    )
    done = np.array([[DONE, DONE], [PENDING, DONE], [PENDING, DONE]], dtype=np.uint8)
    ds = xr.Dataset(
        {
            "masked_loss": (("sample", "prompt", "setting"), masked),
            "full_loss": (("sample", "prompt"), np.array([[5.0, 2.0], [JUNK, 4.0], [JUNK, 3.0]])),
            "done": (("sample", "prompt"), done),
        },
        coords={"start": ("setting", [0, 2]), "stop": ("setting", [2, 4]), "prompt_id": ("prompt", ["a", "b"])},
        attrs={"mode": "mask", "n_image_tokens": 4},
    )
    table = masking_table(ds).set_index(["prompt_id", "setting"])
    # prompt a: 1 sample: [4, 8], full 5; prompt b: [(1+3+5)/3, 3/1] = [3, 3], full 3
    np.testing.assert_allclose(table.loc["a"]["masked_loss"], [4, 8])
    np.testing.assert_allclose(table.loc["b"]["masked_loss"], [3, 3])
    np.testing.assert_allclose(table.loc["all"]["masked_loss"], [3.5, 5.5])
    np.testing.assert_allclose(table.loc["all"]["full_loss"], 4.0)
    np.testing.assert_allclose(table.loc["all"]["delta"], [-0.5, 1.5])
    np.testing.assert_array_equal(table.loc["b"]["n_samples"], [3, 1])
    np.testing.assert_array_equal(table.loc["all"]["n_samples"], [1, 1])  # the fewest samples of any prompt
