"""The XGBoost and LightGBM models of the store's tests: every family x format x task, as a user
hands it over, with the library's own answers (the ``cases`` fixture in ``conftest.py``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import lightgbm as lgb
import numpy as np
import xgboost as xgb

from model_store import boosters as fam

N_FEATURES = 10
TREES = 20
TASKS = ("binary", "multiclass", "regression")


def data(task: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(600, N_FEATURES))
    signal = x[:, 0] + 0.5 * x[:, 1] - x[:, 2] + 0.3 * rng.normal(size=len(x))
    if task == "binary":
        return x, (signal > 0).astype(int)
    if task == "multiclass":
        return x, np.digitize(signal, [-0.7, 0.7])
    return x, 3.0 * signal + x[:, 3] ** 2


def wrapper(family: str, task: str, **kw: Any) -> Any:
    x, y = data(task)
    if family == "xgboost":
        cls = xgb.XGBRegressor if task == "regression" else xgb.XGBClassifier
        return cls(n_estimators=TREES, max_depth=3, n_jobs=1, **kw).fit(x, y)
    cls = lgb.LGBMRegressor if task == "regression" else lgb.LGBMClassifier
    return cls(n_estimators=TREES, num_leaves=8, n_jobs=1, verbose=-1, **kw).fit(x, y)


@dataclass
class Case:
    """A model as a user hands it over, and the library's own answers to compare with."""

    family: str
    fmt: str
    task: str
    model: Any  # what register takes: a wrapper, or a native file's path
    labels: Callable[[np.ndarray], np.ndarray]
    proba: Callable[[np.ndarray], np.ndarray] | None
    thresholds: list[tuple[np.ndarray, np.ndarray]]


def native_answers(family: str, task: str, path: Path) -> tuple[Any, Any]:
    """The library's own predict on a file it loads itself (not through the store)."""
    if family == "xgboost":
        booster = xgb.Booster(model_file=str(path))

        def raw(x: np.ndarray) -> np.ndarray:
            return np.asarray(booster.predict(xgb.DMatrix(x)))
    else:
        booster = lgb.Booster(model_file=str(path))

        def raw(x: np.ndarray) -> np.ndarray:
            return np.asarray(booster.predict(x))
    if task == "regression":
        return raw, None

    def proba(x: np.ndarray) -> np.ndarray:
        p = raw(x)
        return np.vstack((1 - p, p)).T if p.ndim == 1 else p

    return (lambda x: np.argmax(proba(x), axis=1)), proba


def case_keys() -> list[tuple[str, str, str]]:
    out = []
    for task in TASKS:
        out += [("xgboost", f, task) for f in ("joblib", "json", "ubj")]
        out += [("lightgbm", f, task) for f in ("joblib", "txt")]
    return out


def rows(case: Case, n: int = 2_000, seed: int = 3) -> np.ndarray:
    """``n`` generated rows, a third of their values on a split threshold of the model."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(scale=1.5, size=(n, N_FEATURES))
    for features, values in case.thresholds:
        if len(features):
            pick = rng.integers(len(features), size=n // 3 // len(case.thresholds) + 1)
            where = rng.integers(n, size=len(pick))
            rows[where, features[pick]] = values[pick]
    return rows


def make_cases(files: Path) -> dict[tuple[str, str, str], Case]:
    """Each case trained (20 trees) and, for a native format, saved under ``files``."""
    out = {}
    for family, fmt, task in case_keys():
        fitted = wrapper(family, task)
        booster = fitted.get_booster() if family == "xgboost" else fitted.booster_
        thresholds = fam.describe(booster, family).splits  # type: ignore[arg-type]
        if fmt == "joblib":
            path = files / f"{family}-{task}.joblib"
            joblib.dump(fitted, path)
            proba = None if task == "regression" else fitted.predict_proba
            out[family, fmt, task] = Case(family, fmt, task, fitted, fitted.predict, proba,
                                          thresholds)
            continue
        path = files / f"{family}-{task}.{fmt}"
        booster.save_model(str(path))
        labels, proba = native_answers(family, task, path)
        out[family, fmt, task] = Case(family, fmt, task, path, labels, proba, thresholds)
    return out
