"""``python -m bench.backends``: time one model call per backend, for 1 and 64 rows.

Loads a version from the store (verified like the gateway does) and times ``predict`` of the
estimator and of the compiled model on the same rows, median of repeated calls.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model_store import ModelStore
from model_store.compiled import verification_rows
from model_store.estimators import median_call_s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.backends", description=__doc__)
    p.add_argument("--model-root", type=Path, default=Path("models"))
    p.add_argument("--name", default="iris")
    p.add_argument("--version", type=int, default=None, help="default: latest")
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args(argv)
    store = ModelStore(args.model_root)
    version = args.version or store.latest(args.name)
    model = store.load_sync(args.name, version)
    rows = verification_rows(model.estimator, len(model.manifest.features), generated=64)
    print(f"{args.name} v{version}: median of {args.calls} calls, microseconds")
    print("rows  sklearn  onnx  speed-up")
    for n in (1, 64):
        x = rows[:n]
        sk = median_call_s(model.estimator.predict, x, args.calls)
        if model.compiled is None:
            print(f"{n:>4}  {sk * 1e6:>7.0f}  -     (not compiled)")
            continue
        ox = median_call_s(model.compiled.predict, x, args.calls)
        print(f"{n:>4}  {sk * 1e6:>7.0f}  {ox * 1e6:>4.0f}  {sk / ox:>6.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
