"""Probabilities of a scikit-learn random forest without its per-call overhead.

``RandomForestClassifier.predict_proba`` validates its input, then for every tree goes through
joblib, the tree's own validation and a lock: about 30 µs of Python per tree, 3 ms per call for
100 trees however few the rows, nearly all of it holding the GIL. ``ForestProba`` does the same
arithmetic with one ``apply`` per tree (which leaf each row reaches) and a lookup of that
leaf's class fractions, summed in tree order and divided by the number of trees as scikit-learn
does: the result is the estimator's, bit for bit. It is used only for an estimator that passes
that check on rows spread over its thresholds (``forest_proba``); anything else keeps the
estimator's own ``predict_proba``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier

__all__ = ["ForestProba", "forest_proba"]

_FORESTS = (RandomForestClassifier, ExtraTreesClassifier)


class ForestProba:
    """``predict_proba`` of a fitted single-output forest classifier; see the module doc."""

    def __init__(self, estimator: Any) -> None:
        n_classes = int(estimator.n_classes_)
        self._trees = [(e.tree_, np.ascontiguousarray(e.tree_.value[:, 0, :n_classes],
                                                      dtype=np.float64))
                       for e in estimator.estimators_]
        self._n_classes = n_classes

    def predict_proba(self, rows: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(rows, dtype=np.float32)  # the trees compare in float32
        out = np.zeros((len(x), self._n_classes))
        for tree, fractions in self._trees:
            out += fractions[tree.apply(x)]
        out /= len(self._trees)
        return out


def forest_proba(estimator: Any, rows: np.ndarray) -> ForestProba | None:
    """A ``ForestProba`` for ``estimator`` if it is a single-output random (or extra-trees)
    forest classifier whose own ``predict_proba`` it reproduces exactly on ``rows``; else
    None."""
    if type(estimator) not in _FORESTS or getattr(estimator, "n_outputs_", 0) != 1:
        return None
    if not all(hasattr(e, "tree_") for e in getattr(estimator, "estimators_", ())):
        return None
    fast = ForestProba(estimator)
    expected = np.asarray(estimator.predict_proba(rows), dtype=np.float64)
    if not np.array_equal(fast.predict_proba(rows), expected):
        return None
    return fast
