"""Dropping remembered DataFrame column names so plain rows raise no warning."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from model_store.demo import IRIS_FEATURES, iris_data
from model_store.feature_names import drop_fitted_feature_names, fitted_feature_names


def _names(*estimators: object) -> None:
    for e in estimators:
        e.feature_names_in_ = np.asarray(IRIS_FEATURES, dtype=object)


def test_names_are_dropped_wherever_rows_enter() -> None:
    x, y = iris_data()
    columns = ColumnTransformer([("scale", StandardScaler(), [0, 1]),
                                 ("keep", "passthrough", [2, 3])])
    model = make_pipeline(columns, GradientBoostingClassifier(n_estimators=3)).fit(x, y)
    _names(model.steps[0][1], *[t for _, t, _ in columns.transformers_ if t != "passthrough"])
    assert fitted_feature_names(model) == IRIS_FEATURES
    with pytest.warns(UserWarning, match="does not have valid feature names"):
        model.predict(x[:2])
    assert drop_fitted_feature_names(model) >= 2
    assert fitted_feature_names(model) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.predict(x)
    assert drop_fitted_feature_names(model) == 0
