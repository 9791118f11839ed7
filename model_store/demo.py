"""Demo models: Iris species from four measurements, and a heavier synthetic forest."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.datasets import load_iris, make_classification
from sklearn.ensemble import RandomForestClassifier

IRIS_FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")


def iris_data() -> tuple[np.ndarray, np.ndarray]:
    """The 150 Iris rows (float64) and their species names."""
    iris = load_iris()
    species = np.asarray(iris.target_names)[iris.target]
    return np.asarray(iris.data, dtype=np.float64), species


def train_iris(trees: int = 100) -> Any:
    """``RandomForestClassifier(n_estimators=trees, random_state=0)`` fitted on Iris: the demo
    model with 100; with 1,000, a lone call costs milliseconds, more than a Redis lookup on any
    machine (the demo's costs about one on a fast machine, and may be shared or not)."""
    x, y = iris_data()
    return RandomForestClassifier(n_estimators=trees, random_state=0).fit(x, y)


def train_heavy() -> tuple[Any, np.ndarray]:
    """A 300-tree forest on 20 synthetic features (4 classes), and its training rows: a model
    whose calls stay measurable when compiled."""
    x, y = make_classification(n_samples=4000, n_features=20, n_informative=12, n_classes=4,
                               random_state=0)
    model = RandomForestClassifier(n_estimators=300, random_state=0).fit(x, y)
    return model, x
