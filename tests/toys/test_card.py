"""The model card's verdicts: bootstrap intervals over scenes and criteria that can fail.

Synthetic per-scene numbers with known answers (no model): a clear effect is reproduced, the same
effect drowned in scene-to-scene noise is not, and a claim that cannot fail is listed apart.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from vislens.toys.card import BOOTSTRAP, KINDS, Measured, bootstrap, findings, render

LAYERS = 7
N = 48


def test_bootstrap_is_seeded_and_covers_the_mean():
    values = np.random.default_rng(1).normal(0.3, 0.1, 400)
    got = bootstrap(lambda rows: values[rows].mean(1), values.size)
    assert got == bootstrap(lambda rows: values[rows].mean(1), values.size)  # seeded
    assert got.value == values.mean() and got.low < got.value < got.high
    half = 1.96 * values.std() / np.sqrt(values.size)  # the normal approximation, for a large sample
    np.testing.assert_allclose([got.low, got.high], [values.mean() - half, values.mean() + half], atol=0.003)
    constant = bootstrap(lambda rows: np.full(len(rows), 0.5), 10)
    assert (constant.low, constant.high) == (0.5, 0.5)


def synthetic(recall_curve, noise: float, *, seed: int = 0, reduction_at_40: float = 0.7) -> Measured:
    """A Measured whose normal-prompt recall per scene is ``recall_curve`` plus N(0, noise) per scene and
    layer, the other kinds equal to it; cosine peaking at layer 4; image share growing; a truncation
    over k = 1..10 whose pooled reduction at k = 4 is ``reduction_at_40``."""
    rng = np.random.default_rng(seed)
    curve = np.asarray(recall_curve, dtype=np.float64)
    recall = np.repeat((curve + rng.normal(0, noise, (N, LAYERS)))[:, None], len(KINDS), axis=1)
    cos = np.repeat((np.array([0.1, 0.0, 0.2, 0.4, 0.6, 0.5, 0.3]) + rng.normal(0, 0.01, (N, LAYERS)))[:, None], 3, 1)
    share = np.repeat((np.linspace(0.2, 0.8, LAYERS) + rng.normal(0, 0.01, (N, LAYERS)))[:, None], 3, 1)
    share[..., 0] = np.nan  # no attention into layer 0
    ks = np.arange(1, 11)
    pooled = np.interp(ks, [1, 4, 10], [3.0, 3.0 - 2.0 * reduction_at_40, 1.0])
    loss = np.repeat(pooled[None, None], N, 0).repeat(5, 1) + rng.normal(0, 0.01, (N, 5, ks.size))
    full = loss[..., -1]
    frame = pd.DataFrame(recall.mean(0).T, columns=list(KINDS))
    return Measured(
        name="synthetic",
        caption_f1=0.95,
        example_captions=["a red circle"],
        recall=frame,
        precision=frame,
        token_precision=frame,
        cosine=pd.DataFrame(cos.mean(0).T, columns=list(KINDS)),
        image_share=pd.DataFrame(np.vstack([np.full(3, np.nan), share[..., 1:].mean(0).T]), columns=list(KINDS)),
        truncation=pd.Series(loss.mean((0, 1)), index=ks),
        threshold=float(loss.mean()),
        full_loss=float(full.mean()),
        k_for_70=4.0,
        n_image_tokens=10,
        per_scene={
            "recall": recall,
            "precision": recall,
            "token_precision": recall,
            "cosine": cos,
            "image_share": share,
            "loss": loss,
            "full_loss": full,
            "caption_f1": np.full(N, 0.95),
        },
        ks=ks,
    )


def verdicts(family: str, trained: Measured, twin: Measured) -> dict[str, bool]:
    return {f.claim: f.reproduced for f in findings(family, trained, twin) if f.can_fail}


RISE_AND_DROP = [0.02, 0.05, 0.15, 0.25, 0.32, 0.34, 0.28]
SMALL_DROP = [0.16, 0.23, 0.25, 0.23, 0.22, 0.23, 0.231]  # the InstructBLIP toy's: 0.019 below its best


def test_a_clear_drop_is_reproduced_and_a_drop_within_the_noise_is_not():
    twin = synthetic(np.full(LAYERS, 0.02), 0.01, seed=9)
    clear = verdicts("instructblip", synthetic(RISE_AND_DROP, 0.02), twin)
    assert clear["logit lens: a small drop in the last layer"]
    assert (
        clear["logit lens: recall rises with depth"]
        and clear["logit lens: recall near zero at the decoder's input (layer 0)"]
    )
    noisy = findings("instructblip", synthetic(SMALL_DROP, 0.06), twin)
    drop = next(f for f in noisy if f.claim == "logit lens: a small drop in the last layer")
    value = float(drop.measured.split()[0])
    low, high = (float(x) for x in drop.measured[drop.measured.index("[") + 1 : -1].split(", "))
    assert not drop.reproduced and abs(value - 0.019) < 0.01 and low < 0 < high  # a point drop, an interval holding 0


def test_forty_percent_for_seventy_is_judged_against_the_studys_numbers():
    twin = synthetic(np.full(LAYERS, 0.02), 0.01, seed=9)
    claim = "truncation: 40% of the image tokens give 70% of the total loss reduction"
    assert verdicts("llava", synthetic(RISE_AND_DROP, 0.02, reduction_at_40=0.7), twin)[claim]
    assert not verdicts("llava", synthetic(RISE_AND_DROP, 0.02, reduction_at_40=0.45), twin)[claim]
    assert not verdicts("llava", synthetic(RISE_AND_DROP, 0.02, reduction_at_40=0.95), twin)[claim]


def test_a_claim_that_cannot_fail_is_listed_apart():
    trained, twin = synthetic(RISE_AND_DROP, 0.02), synthetic(np.full(LAYERS, 0.02), 0.01, seed=9)
    fixed = [f for f in findings("llava", trained, twin) if not f.can_fail]
    assert [f.claim for f in fixed] == ["logit lens (LLaVA): the prompt kind barely matters"]
    assert all(f.can_fail for f in findings("instructblip", trained, twin))
    record = {"report": {"stages": [{"stage": "joint", "seconds": 1.0, "final_loss": 0.1}], "total_seconds": 1.0}}
    meta = {"date": "today", "n_images": N, "n_caption": N}
    page = render({"llava": (trained, twin)}, {"llava": record}, meta)
    table, apart = page.split("Claims that cannot fail on this toy")
    assert "the prompt kind barely matters" not in table and "the prompt kind barely matters" in apart
    assert "Holds by construction here (LLaVA's image tokens precede the prompt" in apart
    assert f"{BOOTSTRAP} resamples" in table and "| measured [95% interval] |" in table
