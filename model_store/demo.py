"""The demo model: Iris species from four measurements."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier

IRIS_FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")


def iris_data() -> tuple[np.ndarray, np.ndarray]:
    """The 150 Iris rows (float64) and their species names."""
    iris = load_iris()
    species = np.asarray(iris.target_names)[iris.target]
    return np.asarray(iris.data, dtype=np.float64), species


def train_iris() -> Any:
    """``RandomForestClassifier(n_estimators=100, random_state=0)`` fitted on Iris."""
    x, y = iris_data()
    return RandomForestClassifier(n_estimators=100, random_state=0).fit(x, y)
