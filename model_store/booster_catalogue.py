"""``python -m model_store.booster_catalogue``: XGBoost and LightGBM models registered as the
command line registers them (``backend=auto``), and what registration chose, verified and
measured.

The models, trained here from a seeded generator (nothing downloaded):

* ``small``: each family x format x task (XGBoost JSON, UBJSON and a pickled wrapper; LightGBM
  text and a pickled wrapper; binary, 3-class, regression), 20 trees (depth 3, 8 leaves) on 10
  features;
* ``heavy``: a binary classifier of each library as a native file, 500 trees of depth 8
  (LightGBM: up to 255 leaves) on 100 features.

Each is registered into a temporary store; the Markdown table printed says, per model, the
backend serving each output, each candidate's verification (outputs verified, largest
difference, or why it was refused, compile time), and the cost of one call per backend at 1
row and per row at 64 rows, as the manifest records them: the median of the registration's
interleaved rounds, with the range over the rounds in brackets.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import joblib
import numpy as np

from model_store.store import Manifest, ModelStore

__all__ = ["heavy_models", "main", "row", "small_models"]

_TASKS = ("binary", "multiclass", "regression")


def _data(rows: int, features: int, task: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features))
    signal = x[:, :5].sum(axis=1) / 2 + 0.3 * rng.normal(size=rows)
    if task == "binary":
        return x, (signal > 0).astype(int)
    if task == "multiclass":
        return x, np.digitize(signal, [-0.7, 0.7])
    return x, 3.0 * signal + x[:, 5] ** 2


def small_models(directory: Path) -> Iterator[tuple[str, Any]]:
    """(title, what ``register`` takes) for each family x format x task at test size."""
    import lightgbm
    import xgboost

    for task in _TASKS:
        x, y = _data(600, 10, task, 0)
        reg = task == "regression"
        xw = (xgboost.XGBRegressor if reg else xgboost.XGBClassifier)(
            n_estimators=20, max_depth=3, n_jobs=1).fit(x, y)
        lw = (lightgbm.LGBMRegressor if reg else lightgbm.LGBMClassifier)(
            n_estimators=20, num_leaves=8, n_jobs=1, verbose=-1).fit(x, y)
        for fmt in ("json", "ubj"):
            path = directory / f"xgb-{task}.{fmt}"
            xw.get_booster().save_model(path)
            yield f"xgboost {fmt} {task}", path
        joblib.dump(xw, directory / f"xgb-{task}.joblib")
        yield f"xgboost joblib {task}", joblib.load(directory / f"xgb-{task}.joblib")
        path = directory / f"lgb-{task}.txt"
        lw.booster_.save_model(path)
        yield f"lightgbm txt {task}", path
        joblib.dump(lw, directory / f"lgb-{task}.joblib")
        yield f"lightgbm joblib {task}", joblib.load(directory / f"lgb-{task}.joblib")


def heavy_models(directory: Path) -> Iterator[tuple[str, Any]]:
    """(title, native file) of the heavy pair: 500 trees, depth 8, 100 features, binary."""
    import lightgbm
    import xgboost

    x, y = _data(5_000, 100, "binary", 0)
    xb = xgboost.train({"objective": "binary:logistic", "max_depth": 8, "nthread": 2, "seed": 0},
                       xgboost.DMatrix(x, label=y), 500)
    path = directory / "heavy.ubj"
    xb.save_model(path)
    yield "xgboost ubj binary, 500 trees depth 8, 100 features", path
    lb = lightgbm.train({"objective": "binary", "max_depth": 8, "num_leaves": 255,
                         "num_threads": 2, "seed": 0, "verbose": -1},
                        lightgbm.Dataset(x, label=y), 500)
    path = directory / "heavy.txt"
    lb.save_model(path)
    yield "lightgbm txt binary, 500 trees depth 8 (255 leaves), 100 features", path


def _us(figures: dict[str, float], per: int = 1) -> str:
    med, lo, hi = (figures[k] / per for k in ("median_us", "min_us", "max_us"))
    digits = 1 if hi < 100 else 0
    return f"{med:,.{digits}f} [{lo:,.{digits}f} to {hi:,.{digits}f}]"


def _candidate(m: Manifest, name: str) -> str:
    record = m.backends.get(name, {})
    if "error" in record:
        return f"refused: {record['error']}"
    checks = record.get("checks", {})
    parts = []
    for output, check in checks.items():
        what = ("mismatches" if output == "label" and m.task == "classification"
                else "max diff")
        value = check["mismatches"] if what == "mismatches" else f"{check['max_abs_diff']:.1g}"
        parts.append(f"{output} {'ok' if check['verified'] else 'NO'} ({what} {value})")
    took = record.get("compile_s", record.get("convert_s"))
    return "; ".join(parts) + (f"; built in {took:g} s" if took is not None else "")


def row(title: str, m: Manifest) -> str:
    """One Markdown table row for a registered booster model."""
    served = ", ".join(f"{o} {b}" for o, b in m.choice.get("outputs", {}).items())
    measured = m.choice.get("measured", {})
    one = " / ".join(f"{b} {_us(f['1'])}" for b, f in measured.items())
    many = " / ".join(f"{b} {_us(f['64'], 64)}" for b, f in measured.items())
    return (f"| {title} | {served} | {_candidate(m, 'onnx')} | {_candidate(m, 'treelite')} | "
            f"{one} | {many} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model_store.booster_catalogue",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", choices=("small", "heavy", "all"), default="all")
    p.add_argument("--compile-timeout-s", type=float, default=600.0)
    args = p.parse_args(argv)
    print("| model | served | onnx | treelite | 1 row: µs a call | 64 rows: µs a row |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="booster-catalogue-") as tmp:
        store = ModelStore(Path(tmp) / "store")
        groups = [small_models] if args.models == "small" else (
            [heavy_models] if args.models == "heavy" else [small_models, heavy_models])
        n = 0
        for group in groups:
            for title, model in group(Path(tmp)):
                n += 1
                m = store.register(model, f"m{n}", compile_timeout_s=args.compile_timeout_s)
                print(row(title, m), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
