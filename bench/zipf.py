"""Zipf-distributed row choice: rank ``k`` (1-based) drawn with probability ∝ 1 / k**s."""

from __future__ import annotations

import numpy as np

__all__ = ["ZipfSampler"]


class ZipfSampler:
    """Samples indices ``0..n-1`` (index ``i`` has rank ``i + 1``) from a finite Zipf law.

    Raises ValueError for ``n < 1`` or ``s <= 0``.
    """

    def __init__(self, n: int, s: float, *, seed: int = 0) -> None:
        if n < 1 or s <= 0:
            raise ValueError(f"need n >= 1 and s > 0, got n={n}, s={s}")
        weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** s
        self.probabilities = weights / weights.sum()
        self.cdf = np.cumsum(self.probabilities)
        self.cdf[-1] = 1.0
        self._rng = np.random.default_rng(seed)

    def sample(self, k: int) -> np.ndarray:
        """``k`` indices, independent draws."""
        idx: np.ndarray = np.searchsorted(self.cdf, self._rng.random(k), side="right")
        return idx
