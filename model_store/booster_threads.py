"""``python -m model_store.booster_threads``: why an XGBoost or LightGBM call gets one thread.

A 500-tree binary classifier on 100 features of each library is registered as a native file
into a temporary store and loaded as the gateway loads it, once per ``threads`` setting (1 and
2). For 1 and 64 rows it prints a Markdown table of:

* **alone**: the median time of one ``LoadedModel.predict_proba`` call, nothing else running;
* **beside a busy thread**: calls per second while another Python thread of the process runs a
  pure-Python loop, as the event loop does beside the worker thread that calls the model; and
  how much of its progress when alone that loop keeps (1.00: none lost).

The machine's other processes count too: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from model_store.store import LoadedModel, ModelStore

__all__ = ["busy_rate", "main", "train"]


def train(directory: Path, trees: int, features: int, seed: int = 0) -> dict[str, Path]:
    """An XGBoost (``.ubj``) and a LightGBM (``.txt``) binary classifier with ``trees`` trees
    on ``features`` features, saved natively under ``directory``."""
    import lightgbm
    import xgboost

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(5_000, features))
    y = (x[:, :5].sum(axis=1) + rng.normal(size=len(x)) > 0).astype(int)
    xgb = xgboost.XGBClassifier(n_estimators=trees, max_depth=6, n_jobs=2).fit(x, y)
    lgb = lightgbm.LGBMClassifier(n_estimators=trees, n_jobs=2, verbose=-1).fit(x, y)
    out = {"xgboost": directory / "xgb.ubj", "lightgbm": directory / "lgb.txt"}
    xgb.get_booster().save_model(out["xgboost"])
    lgb.booster_.save_model(out["lightgbm"])
    return out


def _loop(stop: threading.Event, out: list[float]) -> None:
    n, start = 0, time.perf_counter()
    while not stop.is_set():
        for _ in range(1_000):
            pass
        n += 1
    out.append(n / (time.perf_counter() - start))


def busy_rate(seconds: float, work: Callable[[], None] | None = None) -> tuple[float, float]:
    """Runs the busy loop in a thread for ``seconds`` while this thread calls ``work`` (or
    waits); returns (calls of ``work`` per second, the loop's rounds per second)."""
    stop, out = threading.Event(), list[float]()
    thread = threading.Thread(target=_loop, args=(stop, out))
    thread.start()
    calls, start = 0, time.perf_counter()
    try:
        if work is None:
            stop.wait(seconds)
        else:
            while time.perf_counter() - start < seconds:
                work()
                calls += 1
    finally:
        stop.set()
        thread.join()
    return calls / (time.perf_counter() - start), out[0]


def _median_us(model: LoadedModel, rows: np.ndarray, calls: int) -> float:
    model.predict_proba(rows)
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        model.predict_proba(rows)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def _caller(model: LoadedModel, rows: np.ndarray) -> Callable[[], None]:
    def call() -> None:
        model.predict_proba(rows)

    return call


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model_store.booster_threads",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trees", type=int, default=500, help="trees per model (default 500)")
    p.add_argument("--features", type=int, default=100, help="features (default 100)")
    p.add_argument("--calls", type=int, default=300,
                   help="calls timed alone, the median is kept (default 300)")
    p.add_argument("--seconds", type=float, default=2.0,
                   help="seconds of each run beside the busy thread (default 2)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        files = train(Path(tmp), args.trees, args.features)
        store = ModelStore(Path(tmp) / "store")
        for family, path in files.items():
            store.register(path, family)
        rows = np.random.default_rng(1).normal(size=(64, args.features))
        _, alone = busy_rate(args.seconds)
        print(f"busy loop alone: {alone:,.0f} rounds/s\n")
        print("| library | threads | rows | alone: one call | beside a busy thread: calls/s "
              "| busy loop keeps |")
        print("|---|---|---|---|---|---|")
        for family in files:
            for threads in (1, 2):
                store.configure(family, 1, {"threads": threads})
                model = store.load_sync(family, 1)
                for n in (1, 64):
                    x = rows[:n]
                    us = _median_us(model, x, args.calls)
                    rate, loop = busy_rate(args.seconds, _caller(model, x))
                    print(f"| {family} | {threads} | {n} | {us:,.0f} µs | {rate:,.0f} | "
                          f"{loop / alone:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
