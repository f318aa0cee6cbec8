"""Host copies: a sample's view reads the right part of the batch, only when the writer asks."""

from __future__ import annotations

import numpy as np
import torch

from vislens.extract.host import HostBatch


def test_slices_read_the_samples_part():
    states = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)  # (layer, batch, token, d)
    batch = HostBatch(states)
    view = batch.slice(slice(None), 1, slice(0, 2))
    np.testing.assert_array_equal(np.asarray(view), states[:, 1, :2].numpy())
    assert np.asarray(view, dtype=np.float16).dtype == np.float16
