"""Command line for the model store: ``python -m model_store COMMAND``.

Commands: train-demo, register, compile, configure, list. ``--root`` (the store, ./models)
may come before or after the command. Exit status: 0 done, 1 the store refused, 2 bad input
(arguments, a file that is not a joblib estimator or a usable booster file of its format,
feature names or classes whose count does not match the model, unreadable training rows).
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path
from typing import Any

import joblib
import numpy as np

from model_store import boosters
from model_store.boosters import BoosterError
from model_store.compiled import CompileError
from model_store.demo import IRIS_FEATURES, iris_data, train_heavy, train_iris
from model_store.settings import ModelSettings
from model_store.store import (
    COMPILE_TIMEOUT_S,
    Manifest,
    ModelStore,
    ModelStoreError,
    describe_estimator,
)

_BACKENDS = ("auto", "library", "onnx", "treelite")


def _backend(text: str) -> str:
    """A ``--backend`` value; ``sklearn`` is the former name of ``library``."""
    return "library" if text == "sklearn" else text
_BACKEND_HELP = ("what is built and verified at registration (GATEWAY_BACKEND says what of it "
                 "serves). auto (default): a scikit-learn estimator also compiled to ONNX, "
                 "served for each output that verifies; an XGBoost or LightGBM model's "
                 "candidates (ONNX, Treelite compiled with the machine's C compiler) built, "
                 "verified and measured, each output served by the fastest that verifies it, "
                 "else the library. library: the model's own library only (a booster's "
                 "verified inplace_predict/predict), no compiled candidate (sklearn: its former "
                 "name). onnx, treelite: fail unless it converts; served for each output that "
                 "verifies")


class InputError(Exception):
    """A file or argument given on the command line is unusable (exit status 2)."""


def _common() -> argparse.ArgumentParser:
    """Options every command takes, before or after its name."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--root", type=Path, default=argparse.SUPPRESS,
                   help="model store root (default: ./models)")
    return p


def _add_tolerances(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-rows", type=Path, default=None, metavar="FILE",
                   help="rows to verify on besides the generated ones: .npy (2-D array) or "
                        ".csv (comma-separated, optional header of feature names), columns in "
                        "feature order")
    p.add_argument("--proba-atol", type=float, default=1e-6,
                   help="largest probability difference accepted from the compiled model "
                        "(default 1e-6)")
    p.add_argument("--value-rtol", type=float, default=1e-5,
                   help="largest difference of a regression value accepted from the compiled "
                        "model, relative to the largest value's magnitude (at least 1; "
                        "default 1e-5)")
    p.add_argument("--compile-timeout-s", type=float, default=COMPILE_TIMEOUT_S,
                   help="longest time building one compiled candidate of an XGBoost or "
                        "LightGBM model may take, seconds; past it the candidate is refused "
                        f"(default {COMPILE_TIMEOUT_S:g})")


def _add_settings(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("serving settings of this version (override the gateway's "
                             "GATEWAY_* defaults)")
    g.add_argument("--max-batch-size", type=int, default=None,
                   help="most rows in one model call (1..65536)")
    g.add_argument("--max-batch-delay-us", type=int, default=None,
                   help="how long a dispatch may wait for its batch to fill, microseconds "
                        "(0..1000000)")
    g.add_argument("--infer-concurrency", type=int, default=None,
                   help="model calls running at once for this version (1..64)")
    g.add_argument("--cache-ttl-s", type=int, default=None,
                   help="Redis entry lifetime of this version's answers, seconds (>= 1)")
    g.add_argument("--execution", choices=("auto", "inline", "thread"), default=None,
                   help="where model calls run: auto (inline when measured tiny), inline or "
                        "thread")
    g.add_argument("--threads", type=int, default=None,
                   help="threads inside one call of an XGBoost or LightGBM model (1..64; "
                        "default 1, which leaves the event loop its core)")


def _settings_given(args: argparse.Namespace) -> dict[str, Any]:
    return {f: getattr(args, f) for f in ModelSettings.fields() if getattr(args, f) is not None}


def _parser() -> argparse.ArgumentParser:
    common = _common()
    p = argparse.ArgumentParser(prog="python -m model_store", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("models"),
                   help="model store root (default: ./models)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("train-demo", parents=[common],
                          help="train a demo model and register it",
                          description="Train the Iris forest (or the heavier demo) and "
                                      "register it as the next version.")
    demo.add_argument("--name", default=None,
                      help="model name (default: iris, or heavy with --heavy)")
    demo.add_argument("--if-absent", "--if-empty", dest="if_absent", action="store_true",
                      help="do nothing when the model (--name) already has a version, "
                           "whatever else the store holds (--if-empty: the former name)")
    demo.add_argument("--heavy", action="store_true",
                      help="the heavier demo: a 300-tree forest on 20 synthetic features")
    demo.add_argument("--backend", type=_backend, choices=_BACKENDS, default="auto",
                      help=_BACKEND_HELP)

    reg = sub.add_parser("register", parents=[common],
                         help="register a fitted estimator (joblib) or a booster file",
                         description="Store a fitted estimator (a joblib file: scikit-learn, "
                                     "or an XGBoost or LightGBM wrapper) or a native booster "
                                     "file (XGBoost .json/.ubj, LightGBM .txt) as a new "
                                     "version, verify it and, by default, compile it (a "
                                     "scikit-learn estimator) or verify its booster path.")
    reg.add_argument("path", type=Path,
                     help="the joblib file of a fitted estimator, or a booster file saved by "
                          "XGBoost (.json, .ubj) or LightGBM (.txt)")
    reg.add_argument("--format", choices=boosters.FORMATS, default=None,
                     help="what the file is, when its suffix does not say: joblib, json or "
                          "ubj (XGBoost Booster.save_model), txt (LightGBM Booster.save_model)"
                          " (default: from the suffix; anything but .json, .ubj, .txt is "
                          "joblib)")
    reg.add_argument("--classes", default=None,
                     help="comma-separated class labels of a booster file's classifier, in "
                          "class-index order (default 0..k-1; labels that are all integers "
                          "stay integers); for an estimator, must equal its classes_")
    reg.add_argument("--name", required=True, help="model name ([A-Za-z0-9][A-Za-z0-9_.-]*)")
    reg.add_argument("--version", type=int, default=None, help="default: the next version")
    reg.add_argument("--features", default=None,
                     help="comma-separated feature names in column order (default: the names "
                          "the estimator was fitted with, else f0..fN; must agree with them)")
    reg.add_argument("--backend", type=_backend, choices=_BACKENDS, default="auto",
                      help=_BACKEND_HELP)
    _add_tolerances(reg)
    _add_settings(reg)

    comp = sub.add_parser("compile", parents=[common],
                          help="compile an existing version and verify it",
                          description="Compile a registered version (a scikit-learn estimator "
                                      "to ONNX; an XGBoost or LightGBM model's candidates, "
                                      "measured and chosen again), verify it per output and "
                                      "record the result in its manifest.")
    comp.add_argument("name", help="model name")
    comp.add_argument("version", type=int, help="version number")
    _add_tolerances(comp)

    conf = sub.add_parser("configure", parents=[common],
                          help="set or clear the serving settings of a version",
                          description="Set (or --unset) serving settings recorded in a "
                                      "version's manifest; with none given, show them.")
    conf.add_argument("name", help="model name")
    conf.add_argument("version", type=int, help="version number")
    _add_settings(conf)
    conf.add_argument("--unset", action="append", default=[], choices=ModelSettings.fields(),
                      metavar="SETTING",
                      help="back to the gateway's default (repeatable): "
                           + ", ".join(ModelSettings.fields()))

    sub.add_parser("list", parents=[common], help="list models, versions, backends, settings",
                   description="One line per version: task, digest, features, classes, "
                               "backend of each output, settings.")
    return p


def _backends(m: Manifest) -> str:
    if m.family != "sklearn":
        return _booster_backend(m)
    onnx = m.backends.get("onnx")
    if onnx is None:
        return "backend=sklearn"
    if "error" in onnx:
        return f"backend=sklearn (onnx failed: {onnx['error']})"
    parts = [f"onnx input={onnx.get('input', 'float64')}"]
    parts += [_check(m, output, check, "onnx" if check["verified"] else "sklearn")
              for output, check in onnx["checks"].items()]
    return " ".join(parts)


def _check(m: Manifest, output: str, check: dict[str, Any], verdict: str) -> str:
    """One output's verification, as ``list`` shows it."""
    detail = (f"mismatches={check['mismatches']}" if output == "label" and m.classes
              else f"max_diff={check['max_abs_diff']:.2g}")
    if output == "label" and m.task == "regression":
        output = "prediction"  # a regressor's value, named as the doors name it
    return f"{output}={verdict}({detail} on {check['rows']} rows)"


def _booster_backend(m: Manifest) -> str:
    record = m.backends.get(m.family, {})
    parts = [f"family={m.family} format={m.format} objective={m.objective}"]
    if "via" not in record:
        return " ".join([*parts, f"backend={record.get('reference', m.family)}"])
    parts.append(f"backend={record['via']}")
    parts += [_check(m, output, check, "verified" if check["verified"] else "not verified")
              for output, check in record["checks"].items()]
    if m.choice:
        measured = m.choice.get("measured", {})
        parts.append("served=" + ",".join(f"{o}:{b}" for o, b in m.choice["outputs"].items()))
        parts += [f"{b}={t['1']['median_us']:.0f}/{t['64']['median_us']:.0f}us"
                  for b, t in measured.items()]
        parts += [f"refused={c}({why})" for c, why in m.choice.get("refused", {}).items()]
    return " ".join(parts)


def _settings(m: Manifest) -> str:
    data = m.settings.to_json()
    return ("settings=" + ",".join(f"{k}={v}" for k, v in data.items())) if data else ""


def _report(m: Manifest, store: ModelStore, done: str = "registered") -> None:
    print(" ".join(x for x in (f"{done} {m.name} v{m.version} sha256={m.sha256[:12]} under "
                               f"{store.root}:", _backends(m), _settings(m)) if x))


def read_estimator(path: Path) -> Any:
    """The fitted estimator in a joblib file. Raises InputError with one clear line."""
    try:
        estimator = joblib.load(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except (pickle.UnpicklingError, EOFError, ImportError, AttributeError, ValueError,
            TypeError, KeyError, IndexError) as exc:
        raise InputError(f"{path}: not a joblib file of an estimator{_what_it_is(path)}"
                         ) from exc
    if not callable(getattr(estimator, "predict", None)):
        raise InputError(f"{path}: holds an object of type {type(estimator).__name__}, not an "
                         "estimator (no predict method)")
    return estimator


def _what_it_is(path: Path) -> str:
    """A hint at what a file that is not a joblib pickle holds instead ("" if unclear)."""
    try:
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError:
        return ""
    if not head:
        return " (the file is empty)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return ""
    if text.lstrip().startswith(("{", "[")):
        return (" (it is JSON: an XGBoost model saved by Booster.save_model is registered "
                "with --format json)")
    if "," in text.splitlines()[0]:
        return (" (it is comma-separated text: rows to verify with go in --train-rows; the "
                "model is the joblib file of the fitted estimator)")
    return " (it is text)"


def read_booster(path: Path, fmt: boosters.Format) -> boosters.BoosterInfo:
    """What a native booster file is, checked without loading it (``register`` then loads it
    in a child process first). Raises InputError."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return boosters.inspect_native(data, fmt)
    except BoosterError as exc:
        raise InputError(f"{path}: {exc}") from exc


def _labels(text: str) -> tuple[Any, ...]:
    cells = tuple(c.strip() for c in text.split(","))
    try:
        return tuple(int(c) for c in cells)
    except ValueError:
        return cells


def _check_counts(path: Path, names: tuple[str, ...] | None, n_features: int,
                  classes: tuple[Any, ...] | None, n_classes: int) -> None:
    """Feature names and classes given on the command line must match the model's counts."""
    if names is not None and len(names) != n_features:
        raise InputError(f"{path}: the model has {n_features} features, --features names "
                         f"{len(names)}")
    if classes is not None and len(classes) != n_classes:
        raise InputError(f"{path}: the model has {n_classes} classes, --classes names "
                         f"{len(classes)}" if n_classes else
                         f"{path}: --classes given for a regressor")


def read_rows(path: Path, features: tuple[str, ...]) -> np.ndarray:
    """Training rows from ``.npy`` or ``.csv`` (a header of feature names may reorder the
    columns). Raises InputError."""
    try:
        if path.suffix == ".npy":
            rows = np.load(path, allow_pickle=False)
        elif path.suffix == ".csv":
            rows = _read_csv(path, features)
        else:
            raise InputError(f"{path}: training rows must be a .npy or .csv file")
        rows = np.asarray(rows, dtype=np.float64)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise InputError(f"{path}: not numeric rows: {exc}") from exc
    if rows.ndim != 2 or rows.shape[1] != len(features) or not len(rows):
        raise InputError(f"{path}: expected rows of {len(features)} columns, got shape "
                         f"{rows.shape}")
    if not np.all(np.isfinite(rows)):
        raise InputError(f"{path}: NaN or infinite values")
    return rows


def _read_csv(path: Path, features: tuple[str, ...]) -> np.ndarray:
    with path.open() as f:
        first = f.readline().strip()
    cells = [c.strip() for c in first.split(",")]
    try:
        [float(c) for c in cells]
    except ValueError:  # a header
        if sorted(cells) != sorted(features):
            raise InputError(f"{path}: header {','.join(cells)} does not name the features "
                             f"{','.join(features)}") from None
        order = [cells.index(f) for f in features]
        return np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)[:, order]
    return np.loadtxt(path, delimiter=",", ndmin=2)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    store = ModelStore(args.root)
    try:
        return _run(args, store)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ModelStoreError, CompileError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, store: ModelStore) -> int:
    if args.command == "train-demo":
        name = args.name or ("heavy" if args.heavy else "iris")
        if args.if_absent and store.models().get(name):
            print(f"{name}: already registered, versions {store.models()[name]}")
            return 0
        rows: np.ndarray | None
        if args.heavy:
            estimator, rows = train_heavy()
            features: tuple[str, ...] = tuple(f"f{i}" for i in range(rows.shape[1]))
        else:
            estimator, features = train_iris(), IRIS_FEATURES
            rows = iris_data()[0]
        _report(store.register(estimator, name, features=features, backend=args.backend,
                               train_rows=rows), store)
    elif args.command == "register":
        names = tuple(args.features.split(",")) if args.features else None
        classes = _labels(args.classes) if args.classes else None
        fmt = args.format or boosters.format_of(args.path)
        model: Any
        if fmt == "joblib":
            model = read_estimator(args.path)
            try:
                fitted, own_classes, _ = describe_estimator(model)
                family = boosters.family_of(model)
                if family != "sklearn":
                    boosters.describe(boosters.wrapped_booster(model, family), family)
            except ValueError as exc:  # BoosterError too
                raise InputError(f"{args.path}: {exc}") from exc
            _check_counts(args.path, names, len(fitted), classes, len(own_classes))
        else:
            info = read_booster(args.path, fmt)
            model = args.path
            fitted = info.feature_names or tuple(f"f{i}" for i in range(info.n_features))
            _check_counts(args.path, names, info.n_features, classes, info.n_classes)
        rows = read_rows(args.train_rows, names or fitted) if args.train_rows else None
        try:
            registered = store.register(
                model, args.name, version=args.version, features=names, classes=classes,
                format=fmt if fmt != "joblib" else None, backend=args.backend, train_rows=rows,
                proba_atol=args.proba_atol, value_rtol=args.value_rtol,
                settings=_settings_given(args), compile_timeout_s=args.compile_timeout_s)
        except BoosterError as exc:  # the library refused the file, or crashed on it
            raise InputError(f"{args.path}: {exc}") from exc
        _report(registered, store)
    elif args.command == "compile":
        features = store.manifest(args.name, args.version).features
        rows = read_rows(args.train_rows, features) if args.train_rows else None
        _report(store.compile(args.name, args.version, train_rows=rows,
                              proba_atol=args.proba_atol, value_rtol=args.value_rtol,
                              compile_timeout_s=args.compile_timeout_s),
                store, "compiled")
    elif args.command == "configure":
        given = _settings_given(args)
        if given or args.unset:
            m = store.configure(args.name, args.version, given, unset=args.unset)
        else:
            m = store.manifest(args.name, args.version)
        print(f"{m.name} v{m.version}: {_settings(m) or 'settings=(global defaults)'}")
    else:
        if not store.root.is_dir():
            raise InputError(f"{store.root}: no model store there (not a directory)")
        if not store.models():
            print(f"{store.root}: no models", file=sys.stderr)
        for name, versions in store.models().items():
            for v in versions:
                try:
                    m = store.manifest(name, v)
                except ModelStoreError as exc:
                    print(f"{name}\tv{v}\tunreadable: {exc}")
                    continue
                print("\t".join(x for x in (
                    f"{name}\tv{v}\t{m.task}\tsha256={m.sha256[:12]}",
                    f"features={','.join(m.features)}",
                    f"classes={','.join(map(str, m.classes))}", _backends(m), _settings(m),
                ) if x))
    return 0


if __name__ == "__main__":
    sys.exit(main())
