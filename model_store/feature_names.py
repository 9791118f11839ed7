"""Serving a DataFrame-fitted estimator plain rows without a warning per call.

An estimator fitted on a DataFrame remembers the column names (``feature_names_in_``) and
warns ``X does not have valid feature names`` each time it is given a plain array, which is
what the gateway passes: float64 rows, columns in the manifest's feature order, itself taken
from those very names at registration. Dropping the remembered names from the estimators that
receive the rows makes the call plain again, at no cost per call; building a DataFrame per
call instead would need pandas and cost tens of microseconds each time.

LightGBM's wrappers (``LGBMClassifier``, ``LGBMRegressor``, 4.5 and later) derive
``feature_names_in_`` from their booster and a private flag, ``_fitted_with_feature_names``;
clearing that flag is their way of dropping the names (lightgbm is bounded below its next minor
for it, and ``tests/model_store/test_families.py`` fails when it stops working).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["drop_fitted_feature_names", "fitted_feature_names"]

_ATTR = "feature_names_in_"
_LIGHTGBM_FLAG = "_fitted_with_feature_names"


def fitted_feature_names(estimator: Any) -> tuple[str, ...] | None:
    """The column names ``estimator`` was fitted with, or None."""
    names = getattr(estimator, _ATTR, None)
    return None if names is None else tuple(str(n) for n in names)


def drop_fitted_feature_names(estimator: Any) -> int:
    """Remove ``feature_names_in_`` from ``estimator`` and every estimator inside it (pipeline
    steps, column-transformer parts, ensemble members, ...), in place. Returns how many were
    removed. Only for an estimator the caller owns (a freshly loaded or copied one)."""
    from sklearn.base import BaseEstimator

    seen: set[int] = set()
    removed = 0
    stack: list[Any] = [estimator]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, list | tuple):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, np.ndarray) and obj.dtype == object:
            stack.extend(obj.ravel().tolist())
        elif isinstance(obj, BaseEstimator):
            state = vars(obj)
            if _ATTR in state:
                del state[_ATTR]
                removed += 1
            if state.get(_LIGHTGBM_FLAG) is True:
                state[_LIGHTGBM_FLAG] = False
                removed += 1
            stack.extend(v for k, v in state.items() if not k.startswith("__"))
    return removed
