"""``python -m model_store.estimators``: the common estimators, compiled, verified and timed.

Each estimator of the catalogue is trained on a dataset shipped with scikit-learn (no
download), registered into a temporary store with ``backend=auto`` (compiled where it verifies)
and loaded as the gateway loads it. The Markdown table printed says, per estimator: the backend
serving each output, the conversion used, the largest difference measured on the verification
rows, and the time of one call by the estimator and by the served backend (median of ``--calls``
calls, 1 row and 64 rows), with the speed-up; with ``--repetitions`` > 1 each figure is the
median over repetitions and the speed-up shows its range.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model_store.compiled import verification_rows
from model_store.store import LoadedModel, Manifest, ModelStore

__all__ = ["Entry", "Registered", "catalogue", "load_dataset", "main", "median_call_s",
           "register_all"]

DATASETS = ("wine", "breast_cancer", "diabetes")


@dataclass(frozen=True, slots=True)
class Entry:
    """One estimator of the catalogue: model name, what it is, the dataset it learns."""

    name: str
    title: str
    dataset: str
    make: Callable[[], Any]


def load_dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows (float64) and targets of a dataset shipped with scikit-learn."""
    from sklearn import datasets

    loader = {"wine": datasets.load_wine, "breast_cancer": datasets.load_breast_cancer,
              "diabetes": datasets.load_diabetes}[name]
    x, y = loader(return_X_y=True)
    return np.asarray(x, dtype=np.float64), np.asarray(y)


def catalogue(trees: int = 100) -> list[Entry]:
    """RandomForest, ExtraTrees, GradientBoosting, HistGradientBoosting, DecisionTree
    classifiers and regressors, LogisticRegression, LinearRegression and Ridge, each bare
    (classifiers on wine, 3 classes) and inside a ``StandardScaler`` pipeline (classifiers on
    breast_cancer, 2 classes); regressors on diabetes. ``trees``: ensemble size."""
    from sklearn import ensemble, linear_model, tree

    seed = {"random_state": 0}
    bare: list[tuple[str, str, Callable[[], Any]]] = [
        ("rf-clf", "RandomForestClassifier",
         lambda: ensemble.RandomForestClassifier(n_estimators=trees, **seed)),
        ("et-clf", "ExtraTreesClassifier",
         lambda: ensemble.ExtraTreesClassifier(n_estimators=trees, **seed)),
        ("gb-clf", "GradientBoostingClassifier",
         lambda: ensemble.GradientBoostingClassifier(n_estimators=trees, **seed)),
        ("hgb-clf", "HistGradientBoostingClassifier",
         lambda: ensemble.HistGradientBoostingClassifier(max_iter=trees, **seed)),
        ("dt-clf", "DecisionTreeClassifier", lambda: tree.DecisionTreeClassifier(**seed)),
        ("logreg", "LogisticRegression",
         lambda: linear_model.LogisticRegression(max_iter=20_000)),
        ("rf-reg", "RandomForestRegressor",
         lambda: ensemble.RandomForestRegressor(n_estimators=trees, **seed)),
        ("et-reg", "ExtraTreesRegressor",
         lambda: ensemble.ExtraTreesRegressor(n_estimators=trees, **seed)),
        ("gb-reg", "GradientBoostingRegressor",
         lambda: ensemble.GradientBoostingRegressor(n_estimators=trees, **seed)),
        ("hgb-reg", "HistGradientBoostingRegressor",
         lambda: ensemble.HistGradientBoostingRegressor(max_iter=trees, **seed)),
        ("dt-reg", "DecisionTreeRegressor", lambda: tree.DecisionTreeRegressor(**seed)),
        ("linreg", "LinearRegression", linear_model.LinearRegression),
        ("ridge", "Ridge", linear_model.Ridge),
    ]
    out: list[Entry] = []
    for name, title, make in bare:
        clf = name.endswith("-clf") or name == "logreg"
        out.append(Entry(name, title, "wine" if clf else "diabetes", make))
    for name, title, make in bare:
        clf = name.endswith("-clf") or name == "logreg"
        out.append(Entry(f"scaled-{name}", f"StandardScaler + {title}",
                         "breast_cancer" if clf else "diabetes", _scaled(make)))
    return out


def _scaled(make: Callable[[], Any]) -> Callable[[], Any]:
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return lambda: make_pipeline(StandardScaler(), make())


@dataclass(frozen=True, slots=True)
class Registered:
    """A catalogue entry trained and registered: its estimator, rows and manifest."""

    entry: Entry
    estimator: Any
    rows: np.ndarray
    manifest: Manifest


def register_all(store: ModelStore, entries: list[Entry]) -> list[Registered]:
    """Train each entry on its dataset and register it (backend ``auto``, the dataset rows as
    training rows for verification)."""
    out = []
    for entry in entries:
        x, y = load_dataset(entry.dataset)
        estimator = entry.make().fit(x, y)
        manifest = store.register(estimator, entry.name, backend="auto", train_rows=x)
        out.append(Registered(entry, estimator, x, manifest))
    return out


def max_difference(m: Manifest) -> tuple[str, float | None]:
    """The output whose difference is reported (probabilities, else values) and the largest
    difference verification measured (None when not compiled)."""
    checks = m.backends.get("onnx", {}).get("checks")
    if not checks:
        return ("probabilities" if m.task == "classification" else "values"), None
    if "probabilities" in checks:
        return "probabilities", float(checks["probabilities"]["max_abs_diff"])
    if m.task == "regression":
        return "values", float(checks["label"]["max_abs_diff"])
    return "labels", float(checks["label"]["mismatches"])


def median_call_s(fn: Callable[[np.ndarray], object], rows: np.ndarray, calls: int) -> float:
    """Median seconds of ``calls`` calls of ``fn(rows)`` (after one warm-up call)."""
    fn(rows)
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        fn(rows)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def time_model(model: LoadedModel, calls: int, repetitions: int
               ) -> dict[int, tuple[float, float, float, float]]:
    """Per row count (1, 64): median over repetitions of the estimator's and the served
    backend's median call (seconds), and the smallest and largest speed-up seen."""
    rows = verification_rows(model.estimator, len(model.manifest.features), generated=64)[:64]
    out = {}
    for n in (1, 64):
        x = rows[:n]
        sk, served, ups = [], [], []
        for _ in range(repetitions):
            a = median_call_s(model.estimator.predict, x, calls)  # scikit-learn's own
            b = (median_call_s(lambda r: model.predict(r, prefer_compiled=True), x, calls)
                 if model.backend("label") == "onnx" else a)
            sk.append(a)
            served.append(b)
            ups.append(a / b)
        out[n] = (statistics.median(sk), statistics.median(served), min(ups), max(ups))
    return out


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f}" if seconds >= 1e-5 else f"{seconds * 1e6:.1f}"


def _cell(sk: float, served: float, lo: float, hi: float) -> str:
    mid = sk / served
    spread = f" ({lo:.1f} to {hi:.1f})" if hi - lo >= 0.05 else ""
    return f"{_us(sk)} → {_us(served)} µs, {mid:,.1f}x{spread}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model_store.estimators", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trees", type=int, default=100,
                   help="ensemble size (trees, boosting iterations; default 100)")
    p.add_argument("--calls", type=int, default=200,
                   help="calls timed per figure, the median is kept (default 200)")
    p.add_argument("--repetitions", type=int, default=3,
                   help="repetitions of each timing; the table shows the median and the "
                        "speed-up's range (default 3)")
    p.add_argument("--only", default=None,
                   help="comma-separated model names of the catalogue to run (default: all)")
    args = p.parse_args(argv)
    entries = catalogue(args.trees)
    if args.only:
        wanted = set(args.only.split(","))
        entries = [e for e in entries if e.name in wanted]
    with tempfile.TemporaryDirectory() as root:
        store = ModelStore(Path(root))
        registered = register_all(store, entries)
        print("| estimator | dataset | served by | conversion | max difference | "
              "1 row: sklearn → served | 64 rows: sklearn → served |")
        print("|---|---|---|---|---|---|---|")
        for r in registered:
            model = store.load_sync(r.entry.name, r.manifest.version)
            served = ", ".join(f"{o if r.manifest.classes else 'value'} {b}"
                               for o, b in model.backends().items())
            onnx = r.manifest.backends.get("onnx", {})
            conversion = onnx.get("input", "—") if "error" not in onnx else "failed"
            what, diff = max_difference(r.manifest)
            compiled = model.backend("label") == "onnx"
            diff_text = ("—" if diff is None else f"{diff:.1g} ({what})" if compiled
                         else f"onnx off by {diff:.1g} ({what}): not served")
            times = time_model(model, args.calls, args.repetitions)
            cells = [_cell(*times[n]) if compiled else f"{_us(times[n][0])} µs (sklearn)"
                     for n in (1, 64)]
            print(f"| {r.entry.title} | {r.entry.dataset} | {served} | {conversion} | "
                  f"{diff_text} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
