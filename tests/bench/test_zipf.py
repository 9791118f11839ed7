"""The Zipf sampler follows its law."""

from __future__ import annotations

import numpy as np
import pytest

from bench.zipf import ZipfSampler


def test_zipf_sampler_follows_the_law() -> None:
    z = ZipfSampler(10_000, 1.1, seed=3)
    h = (1.0 / np.arange(1, 10_001) ** 1.1).sum()
    assert z.probabilities[0] == pytest.approx(1 / h)
    assert z.probabilities[1] / z.probabilities[0] == pytest.approx(2 ** -1.1)
    draws = z.sample(200_000)
    assert draws.min() >= 0 and draws.max() < 10_000
    freq0 = np.mean(draws == 0)
    assert freq0 == pytest.approx(1 / h, rel=0.05)
    assert np.mean(draws == 1) < freq0
    with pytest.raises(ValueError):
        ZipfSampler(0, 1.1)
