"""Command line: ``python -m model_store {train-demo,register,list}``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import joblib

from model_store.demo import IRIS_FEATURES, train_iris
from model_store.store import ModelStore, ModelStoreError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model_store", description=__doc__)
    p.add_argument("--root", type=Path, default=Path("models"), help="store root (./models)")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("train-demo", help="train the Iris forest and register it")
    demo.add_argument("--name", default="iris")
    demo.add_argument(
        "--if-empty", action="store_true", help="do nothing when the model already has a version"
    )

    reg = sub.add_parser("register", help="register a joblib-pickled fitted estimator")
    reg.add_argument("path", type=Path)
    reg.add_argument("--name", required=True)
    reg.add_argument("--version", type=int, default=None, help="default: the next version")
    reg.add_argument(
        "--features", default=None, help="comma-separated feature names, in column order"
    )

    sub.add_parser("list", help="list models, versions, features and classes")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    store = ModelStore(args.root)
    try:
        if args.command == "train-demo":
            if args.if_empty and store.models().get(args.name):
                print(f"{args.name}: already registered, versions {store.models()[args.name]}")
                return 0
            m = store.register(train_iris(), args.name, features=IRIS_FEATURES)
            print(f"registered {m.name} v{m.version} sha256={m.sha256[:12]} under {store.root}")
        elif args.command == "register":
            features = args.features.split(",") if args.features else None
            m = store.register(
                joblib.load(args.path), args.name, version=args.version, features=features
            )
            print(f"registered {m.name} v{m.version} sha256={m.sha256[:12]} under {store.root}")
        else:
            for name, versions in store.models().items():
                for v in versions:
                    m = store.manifest(name, v)
                    print(
                        f"{name}\tv{v}\t{m.task}\tsha256={m.sha256[:12]}\t"
                        f"features={','.join(m.features)}\tclasses={','.join(map(str, m.classes))}"
                    )
    except (ModelStoreError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
