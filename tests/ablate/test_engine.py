"""The shared-prefix engine equals one full forward per truly ablated input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.ablate.conftest import LONG, LOSS_TOL, SHORT, hf_token_losses, pairs_of
from vislens.ablate import Work, naive_losses, run_prefix, shared_prefix_losses
from vislens.ablate.engine import PairInput, image_span
from vislens.errors import ModelError

N_IMAGE = 25
SINGLES = [(i, i + 1) for i in range(N_IMAGE)]
INTERVALS = [(0, 5), (3, 20), (10, 25), (0, 25), (24, 25)]
CASES = {
    "truncate": ("remove", [(k, N_IMAGE) for k in range(N_IMAGE + 1)]),
    "mask-remove": ("remove", SINGLES + INTERVALS),
    "mask-block": ("block", SINGLES + INTERVALS),
}


def _run(fn, adapter, pair, settings, style, **kwargs):
    start, stop = (np.array(v) for v in zip(*settings))
    with torch.inference_mode():
        return fn(adapter, pair, start, stop, shift=style == "remove", **kwargs)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", ["mha", "gqa"])
def test_shared_prefix_equals_naive_and_the_models_own_forward(loaded, hf, manifest, arch, case):
    style, settings = CASES[case]
    adapter = loaded[arch].adapter
    planned, inputs = pairs_of(adapter, manifest, [SHORT, LONG])
    model, processor = hf[arch]
    for plan, pair in zip(planned, inputs):
        assert pair.n_image == N_IMAGE
        shared = _run(shared_prefix_losses, adapter, pair, settings, style, batch_size=8)
        naive = _run(naive_losses, adapter, pair, settings, style, batch_size=8)
        start, stop = zip(*settings)
        reference = hf_token_losses(model, processor, plan.record.image, plan.context, plan.text, start, stop, style)
        assert shared.shape == (len(settings), plan.n_caption)
        np.testing.assert_allclose(shared, reference, **LOSS_TOL)
        np.testing.assert_allclose(naive, reference, **LOSS_TOL)
        np.testing.assert_allclose(shared.mean(1), reference.mean(1), **LOSS_TOL)
        # the settings really change the loss, so equality above is not vacuous
        assert np.ptp(reference.mean(1)) > 1e-3


@pytest.mark.parametrize("arch", ["mha", "gqa"])
def test_batching_and_padding_do_not_change_losses(loaded, manifest, arch):
    adapter = loaded[arch].adapter
    settings = SINGLES[::3] + INTERVALS  # tails of many lengths: padded batches
    _, together = pairs_of(adapter, manifest, [SHORT, LONG], image=1)
    _, alone = pairs_of(adapter, manifest, [LONG], image=1)
    assert together[0].n_tokens < together[1].n_tokens  # prompts of different lengths, right-padded together
    one = _run(shared_prefix_losses, adapter, together[1], settings, "remove", batch_size=1)
    for batch in (3, 7, 64):
        np.testing.assert_allclose(
            _run(shared_prefix_losses, adapter, together[1], settings, "remove", batch_size=batch), one, **LOSS_TOL
        )
    np.testing.assert_allclose(_run(shared_prefix_losses, adapter, alone[0], settings, "remove"), one, **LOSS_TOL)
    np.testing.assert_allclose(
        _run(naive_losses, adapter, together[1], settings, "remove", batch_size=5), one, **LOSS_TOL
    )
    np.testing.assert_allclose(
        _run(naive_losses, adapter, together[1], settings, "remove", batch_size=1), one, **LOSS_TOL
    )


def test_a_prefix_serves_every_prompt_with_the_same_text_before_the_image(loaded, manifest):
    adapter = loaded["gqa"].adapter
    _, (short, long) = pairs_of(adapter, manifest, [SHORT, LONG])
    assert np.array_equal(short.token_ids[: short.prefix_len], long.token_ids[: long.prefix_len])
    settings = CASES["truncate"][1]
    with torch.inference_mode():
        prefix = run_prefix(adapter, short)
    reused = _run(shared_prefix_losses, adapter, long, settings, "remove", prefix=prefix)
    np.testing.assert_allclose(reused, _run(shared_prefix_losses, adapter, long, settings, "remove"), **LOSS_TOL)


def test_work_counts_tokens_and_attention(loaded, manifest):
    adapter = loaded["mha"].adapter
    _, (pair,) = pairs_of(adapter, manifest, [SHORT])
    settings = CASES["truncate"][1]
    shared, naive = Work(), Work()
    _run(shared_prefix_losses, adapter, pair, settings, "remove", batch_size=26, work=shared)
    _run(naive_losses, adapter, pair, settings, "remove", batch_size=26, work=naive)
    suffix = pair.n_tokens - 1 - pair.prefix_len
    assert shared.forwards == naive.forwards + 1 == 2
    assert shared.tokens == pair.prefix_len + 26 * suffix
    assert naive.tokens == 26 * (pair.n_tokens - 1)  # padded to the longest (k = 25)
    assert shared.attention_pairs < naive.attention_pairs


def test_image_tokens_must_be_one_run_and_precede_text_before_the_caption():
    assert image_span(np.array([0, 0, 1, 1, 1, 0], dtype=bool)) == (2, 3)
    with pytest.raises(ModelError, match="not one contiguous run"):
        image_span(np.array([0, 1, 0, 1], dtype=bool))
    with pytest.raises(ModelError, match="no image tokens"):
        image_span(np.zeros(4, dtype=bool))
    pair = PairInput(torch.zeros(8, 4), np.arange(8), image_start=1, n_image=4, caption_start=5)
    with pytest.raises(ModelError, match="at least one text token"):
        shared_prefix_losses(None, pair, np.array([1]), np.array([4]), shift=True)


@pytest.mark.parametrize("style", ["remove", "block"])
def test_image_first_inputs_work_with_an_empty_cache(loaded, manifest, style):
    """InstructBLIP puts its query tokens before BOS: nothing precedes the image, masking [0, e) caches nothing."""
    adapter = loaded["mha"].adapter
    _, (pair,) = pairs_of(adapter, manifest, [SHORT])
    a = pair.image_start
    first = PairInput(pair.embeds[a:], pair.token_ids[a:], 0, pair.n_image, pair.caption_start - a)
    settings = [(0, 1), (0, 7), (0, 25), (3, 9), (24, 25)]
    shared = _run(shared_prefix_losses, adapter, first, settings, style, batch_size=2)
    np.testing.assert_allclose(shared, _run(naive_losses, adapter, first, settings, style), **LOSS_TOL)
    assert np.isfinite(shared).all()


def test_removed_spans_cover_the_text_between_image_tokens():
    """Idefics3's image tokens come in runs separated by tile markers: a span runs from image token
    s through image token e - 1, markers inside included; an empty interval removes nothing."""
    pair = PairInput(torch.zeros(10, 4), np.arange(10), 2, 4, 8, image_positions=np.array([2, 3, 5, 6]))
    assert pair.prefix_len == 7
    first, end = pair.removed_span(np.array([0, 1, 2, 3, 4, 2]), np.array([4, 3, 3, 4, 4, 2]))
    np.testing.assert_array_equal(first, [2, 3, 5, 6, 7, 5])
    np.testing.assert_array_equal(end, [7, 6, 6, 7, 7, 5])
    with pytest.raises(ModelError, match="do not start at 1"):
        PairInput(torch.zeros(10, 4), np.arange(10), 1, 4, 8, image_positions=np.array([2, 3, 5, 6]))
