"""Command line: ``python -m model_store {train-demo,register,list}``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import joblib

from model_store.compiled import CompileError
from model_store.demo import IRIS_FEATURES, iris_data, train_heavy, train_iris
from model_store.store import Manifest, ModelStore, ModelStoreError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model_store", description=__doc__)
    p.add_argument("--root", type=Path, default=Path("models"), help="store root (./models)")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("train-demo", help="train the Iris forest and register it")
    demo.add_argument("--name", default="iris")
    demo.add_argument(
        "--if-empty", action="store_true", help="do nothing when the model already has a version"
    )
    demo.add_argument("--heavy", action="store_true",
                      help="the heavier demo: a 300-tree forest on 20 synthetic features "
                           "(registered as 'heavy' unless --name is given)")
    demo.add_argument("--backend", choices=("auto", "sklearn", "onnx"), default="auto")

    reg = sub.add_parser("register", help="register a joblib-pickled fitted estimator")
    reg.add_argument("path", type=Path)
    reg.add_argument("--name", required=True)
    reg.add_argument("--version", type=int, default=None, help="default: the next version")
    reg.add_argument(
        "--features", default=None, help="comma-separated feature names, in column order"
    )
    reg.add_argument("--backend", choices=("auto", "sklearn", "onnx"), default="auto",
                     help="auto: compile to ONNX when it converts and verifies (default)")
    reg.add_argument("--proba-atol", type=float, default=1e-6)

    comp = sub.add_parser("compile", help="compile an existing version to ONNX and verify it")
    comp.add_argument("name")
    comp.add_argument("version", type=int)
    comp.add_argument("--proba-atol", type=float, default=1e-6,
                      help="largest probability difference accepted (1e-6)")

    sub.add_parser("list", help="list models, versions, features and classes")
    return p


def _backends(m: Manifest) -> str:
    onnx = m.backends.get("onnx")
    if onnx is None:
        return "backend=sklearn"
    if "error" in onnx:
        return f"backend=sklearn (onnx failed: {onnx['error']})"
    parts = []
    for output, check in onnx["checks"].items():
        verdict = "onnx" if check["verified"] else "sklearn"
        detail = (f"mismatches={check['mismatches']}" if output == "label"
                  else f"max_diff={check['max_abs_diff']:.2g}")
        parts.append(f"{output}={verdict}({detail} on {check['rows']} rows)")
    return " ".join(parts)


def _report(m: Manifest, store: ModelStore, done: str = "registered") -> None:
    print(f"{done} {m.name} v{m.version} sha256={m.sha256[:12]} under {store.root}: "
          f"{_backends(m)}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    store = ModelStore(args.root)
    try:
        if args.command == "train-demo":
            name = args.name if args.name != "iris" or not args.heavy else "heavy"
            if args.if_empty and store.models().get(name):
                print(f"{name}: already registered, versions {store.models()[name]}")
                return 0
            if args.heavy:
                estimator, rows = train_heavy()
                features = tuple(f"f{i}" for i in range(rows.shape[1]))
            else:
                estimator, features = train_iris(), IRIS_FEATURES
                rows = iris_data()[0]
            m = store.register(estimator, name, features=features, backend=args.backend,
                               train_rows=rows)
            _report(m, store)
        elif args.command == "register":
            names = args.features.split(",") if args.features else None
            m = store.register(
                joblib.load(args.path), args.name, version=args.version, features=names,
                backend=args.backend, proba_atol=args.proba_atol,
            )
            _report(m, store)
        elif args.command == "compile":
            _report(store.compile(args.name, args.version, proba_atol=args.proba_atol), store,
                    "compiled")
        else:
            for name, versions in store.models().items():
                for v in versions:
                    m = store.manifest(name, v)
                    print(
                        f"{name}\tv{v}\t{m.task}\tsha256={m.sha256[:12]}\t"
                        f"features={','.join(m.features)}\tclasses={','.join(map(str, m.classes))}"
                        f"\t{_backends(m)}"
                    )
    except (ModelStoreError, CompileError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
