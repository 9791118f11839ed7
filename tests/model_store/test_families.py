"""XGBoost and LightGBM models in the store: every family x format x task registered, loaded
and answering as the library itself does (its own fast path here; the compiled candidates in
``test_booster_compiled.py``); threads; bad input refused at the door.

Registering a booster *file* loads it in a child process first (``model_store.child``), so the
tests that do are ``e2e``."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import joblib
import lightgbm as lgb
import numpy as np
import pytest
import xgboost as xgb

from model_store import ArtifactRejected, ModelStore
from model_store import boosters as fam
from model_store.__main__ import main as cli
from model_store.boosters import BoosterError
from tests.model_store.booster_cases import N_FEATURES, TASKS, TREES, Case
from tests.model_store.booster_cases import case_keys as _cases
from tests.model_store.booster_cases import data as _data
from tests.model_store.booster_cases import rows as _rows

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
@pytest.mark.parametrize(("family", "fmt", "task"), _cases())
def test_registered_model_answers_as_the_library(
        cases: dict[tuple[str, str, str], Case], tmp_path: Path, family: str, fmt: str,
        task: str) -> None:
    case = cases[family, fmt, task]
    store = ModelStore(tmp_path)
    m = store.register(case.model, "m", backend="library")
    assert (m.family, m.format, m.task) == (family, fmt,
                                           "regression" if task == "regression"
                                           else "classification")
    assert m.artifact == ("model.joblib" if fmt == "joblib" else f"booster.{fmt}")
    if fmt != "joblib":  # the native file itself is the artifact
        assert (tmp_path / "m" / "1" / m.artifact).read_bytes() == case.model.read_bytes()
    assert m.features == tuple(f"f{i}" for i in range(N_FEATURES))
    assert m.library_versions[family] == fam.library_version(family)  # type: ignore[arg-type]
    record = m.backends[family]
    assert set(record["checks"]) == ({"label"} if task == "regression"
                                     else {"label", "probabilities"})
    assert all(c["verified"] for c in record["checks"].values()), record
    assert not m.choice and not set(m.backends) & {"onnx", "treelite"}  # none tried

    model = store.load_sync("m", 1)
    assert model.booster is not None and model.booster.threads == 1
    outputs = ["label"] if task == "regression" else ["label", "probabilities"]
    assert model.backends() == dict.fromkeys(outputs, family)
    rows = _rows(case)
    got = np.asarray(model.predict(rows))
    want = case.labels(rows)
    if task == "regression":
        check = record["checks"]["label"]
        scale = max(1.0, float(np.max(np.abs(want))))
        assert np.max(np.abs(got - want)) <= check["rtol"] * scale
        return
    assert m.classes == tuple(range(3 if task == "multiclass" else 2))
    assert got.tolist() == want.tolist()  # labels exactly
    assert case.proba is not None
    proba = np.asarray(model.predict_proba(rows))
    assert np.max(np.abs(proba - case.proba(rows))) <= record["checks"]["probabilities"]["atol"]
    assert np.allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    assert model.both_in_one_call()
    labels, both = model.predict_both(rows)
    assert labels == got.tolist() and np.array_equal(np.asarray(both), proba)


@pytest.mark.e2e
@pytest.mark.parametrize("family", ["xgboost", "lightgbm"])
def test_estimator_mode_serves_the_same_answers_without_the_booster_path(
        cases: dict[tuple[str, str, str], Case], tmp_path: Path, family: str) -> None:
    import dataclasses

    store = ModelStore(tmp_path)
    for fmt in ("joblib", "ubj" if family == "xgboost" else "txt"):
        case = cases[family, fmt, "multiclass"]
        m = store.register(case.model, fmt, backend="library")
        fast = store.load_sync(fmt, m.version)
        plain = dataclasses.replace(fast, booster=None)  # what GATEWAY_BACKEND=estimator does
        rows = _rows(case, 500)
        assert plain.predict(rows) == fast.predict(rows)
        assert np.max(np.abs(np.asarray(plain.predict_proba(rows))
                             - np.asarray(fast.predict_proba(rows)))) <= 1e-6
        assert plain.both_in_one_call()


@pytest.mark.e2e
def test_native_classes_features_and_objectives(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    x, y = _data("multiclass")
    names = [f"c{i}" for i in range(N_FEATURES)]
    booster = xgb.train({"objective": "multi:softmax", "num_class": 3, "max_depth": 3},
                        xgb.DMatrix(x, label=y, feature_names=names), TREES)
    m = store.register(booster, "soft", classes=["low", "mid", "high"],  # a Booster object
                       backend="library")
    assert (m.format, m.objective, m.features) == ("ubj", "multi:softmax", tuple(names))
    assert m.classes == ("low", "mid", "high")
    model = store.load_sync("soft", 1)
    rows = _rows(Case("xgboost", "ubj", "multiclass", None, np.sum, None, []), 1_000)
    own = booster.predict(xgb.DMatrix(rows, feature_names=names)).astype(int)
    assert model.predict(rows) == np.asarray(["low", "mid", "high"])[own].tolist()
    with pytest.raises(ValueError, match="disagree with those the booster was fitted with"):
        store.register(booster, "soft", features=[f"x{i}" for i in range(N_FEATURES)])
    with pytest.raises(ValueError, match="2 classes given, the multi:softmax model has 3"):
        store.register(booster, "soft", classes=["a", "b"])

    # LightGBM's automatic Column_<i> names count as none: --features may name them.
    reg = lgb.train({"objective": "regression", "verbose": -1, "num_leaves": 8},
                    lgb.Dataset(*_data("regression")), TREES)
    path = tmp_path / "reg.txt"
    reg.save_model(str(path))
    m = store.register(path, "reg", features=names, backend="library")
    assert m.features == tuple(names) and m.classes == () and m.objective == "regression"
    with pytest.raises(ValueError, match="classes given for a regressor"):
        store.register(path, "reg", classes=["a"])
    named = lgb.LGBMClassifier(n_estimators=TREES, verbose=-1).fit(
        *_data("binary"), feature_name=names)
    m = store.register(named, "named", backend="library")  # fitted with names: the features
    assert m.features == tuple(names)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "X does not have valid feature names" per call
        plain = store.load_sync("named", 1).estimator
        plain.predict(_data("binary")[0][:5])  # else re-check LGBMModel._fitted_with_feature_names


@pytest.mark.e2e
@pytest.mark.slow
def test_early_stopped_wrappers_serve_their_best_iteration(tmp_path: Path) -> None:
    x, y = _data("binary")
    xw = xgb.XGBClassifier(n_estimators=200, max_depth=3, early_stopping_rounds=2,
                           learning_rate=0.5).fit(x[:400], y[:400], eval_set=[(x[400:], y[400:])],
                                                  verbose=False)
    lw = lgb.LGBMClassifier(n_estimators=200, learning_rate=0.5, verbose=-1).fit(
        x[:400], y[:400], eval_X=(x[400:],), eval_y=(y[400:],),
        callbacks=[lgb.early_stopping(2, verbose=False)])
    assert xw.best_iteration < 199 and lw.best_iteration_ < 200
    store = ModelStore(tmp_path)
    rows = np.random.default_rng(5).normal(scale=1.5, size=(2_000, N_FEATURES))
    for name, wrapper in (("x", xw), ("l", lw)):
        for backend in ("library", "onnx", "treelite"):  # the compiled ones: the same trees
            m = store.register(wrapper, f"{name}-{backend}", backend=backend)  # type: ignore[arg-type]
            model = store.load_sync(m.name, 1)
            assert model.booster is not None
            served = set(model.backends().values())
            assert served <= {backend, m.family}, m.choice
            assert model.predict(rows) == wrapper.predict(rows).tolist(), backend
            atol = m.backends[m.family]["checks"]["probabilities"]["atol"]
            proba = np.asarray(model.predict_proba(rows))
            if served == {m.family}:
                assert np.array_equal(proba, wrapper.predict_proba(rows))
            else:
                assert np.max(np.abs(proba - wrapper.predict_proba(rows))) <= atol


@pytest.mark.e2e
@pytest.mark.parametrize("fmt", ["txt", "joblib"])
def test_lightgbm_serves_through_its_c_api_exactly_as_booster_predict(
        cases: dict[tuple[str, str, str], Case], tmp_path: Path, fmt: str) -> None:
    store = ModelStore(tmp_path)
    for task in TASKS:
        case = cases["lightgbm", fmt, task]
        m = store.register(case.model, task, backend="library")
        assert m.backends["lightgbm"]["via"] == fam.LIGHTGBM_C_API
        assert m.backends["lightgbm"]["one_row"] == fam.LIGHTGBM_ONE_ROW
        model = store.load_sync(task, 1)
        assert model.booster is not None and model.booster.via == fam.LIGHTGBM_C_API
        assert model.booster.one_row == fam.LIGHTGBM_ONE_ROW
        own = fam.BoosterModel(model.booster.booster, model.booster.info,
                               m.classes or None, via="Booster.predict")
        assert own.via == "Booster.predict" and own.one_row is None
        rows = _rows(case)
        for n in (1, 7, len(rows)):  # bit for bit as Booster.predict, a lone row included
            _same(model.booster.run(rows[:n]), own.run(rows[:n]))
        block = model.booster.run(rows)
        for i in range(0, len(rows), 17):  # a lone row: the single-row predictor, bit for bit
            _same(model.booster.run(rows[i:i + 1]), (block[0][i:i + 1], None if block[1] is None
                                                      else block[1][i:i + 1]))
    vdir = tmp_path / "binary" / "1"
    manifest = json.loads((vdir / "model.json").read_text())
    # a version registered before lone rows were checked sends them through the block call
    del manifest["backends"]["lightgbm"]["one_row"]
    (vdir / "model.json").write_text(json.dumps(manifest))
    older = store.load_sync("binary", 1)
    assert older.booster is not None and older.booster.via == fam.LIGHTGBM_C_API
    assert older.booster.one_row is None
    # a version registered when Booster.predict was the verified path keeps serving through it
    manifest["backends"]["lightgbm"]["via"] = "Booster.predict"
    (vdir / "model.json").write_text(json.dumps(manifest))
    older = store.load_sync("binary", 1)
    assert older.booster is not None and older.booster.via == "Booster.predict"


def _same(got: tuple[Any, Any], want: tuple[Any, Any]) -> None:
    assert np.array_equal(got[0], want[0])
    assert (got[1] is None) == (want[1] is None)
    if got[1] is not None:
        assert np.array_equal(got[1], want[1])


def test_a_lone_row_path_that_answers_otherwise_is_not_served(
        cases: dict[tuple[str, str, str], Case], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    case = cases["lightgbm", "joblib", "binary"]
    run = fam.BoosterModel.run

    def off_alone(self: fam.BoosterModel, rows: np.ndarray) -> Any:
        labels, proba = run(self, rows)
        if len(rows) == 1 and self.one_row is not None:
            proba = np.nextafter(proba, 2.0)  # one ulp: within any tolerance, yet not the same
        return labels, proba

    monkeypatch.setattr(fam.BoosterModel, "run", off_alone)
    m = ModelStore(tmp_path).register(case.model, "binary", backend="library")
    assert m.backends["lightgbm"]["via"] == fam.LIGHTGBM_C_API
    assert "one_row" not in m.backends["lightgbm"]
    assert "answers a row alone unlike" in caplog.text
    model = ModelStore(tmp_path).load_sync("binary", 1)
    assert model.booster is not None and model.booster.one_row is None


def _xgb_threads(booster: Any) -> int:
    return int(json.loads(booster.save_config())["learner"]["generic_param"]["nthread"])


@pytest.mark.e2e
def test_threads_setting_reaches_the_library(
        cases: dict[tuple[str, str, str], Case], tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.register(cases["xgboost", "ubj", "binary"].model, "x", backend="library")
    store.register(cases["xgboost", "joblib", "binary"].model, "xw", backend="library")
    store.register(cases["lightgbm", "txt", "binary"].model, "l", settings={"threads": 2},
                   backend="library")
    store.register(cases["lightgbm", "joblib", "binary"].model, "lw", backend="library")
    x = store.load_sync("x", 1)
    assert x.booster is not None and x.booster.threads == 1
    assert _xgb_threads(x.estimator.booster) == 1
    assert store.configure("x", 1, {"threads": 2}).settings.threads == 2
    x = store.load_sync("x", 1)
    assert x.booster is not None and x.booster.threads == 2
    assert _xgb_threads(x.estimator.booster) == 2
    xw = store.load_sync("xw", 1)
    assert _xgb_threads(xw.estimator.get_booster()) == 1 and xw.estimator.n_jobs == 1
    lo = store.load_sync("l", 1)
    assert lo.booster is not None and lo.booster.threads == 2
    assert store.load_sync("lw", 1).estimator.n_jobs == 1  # the wrapper's own predict too
    # scikit-learn models have no such setting
    from sklearn.tree import DecisionTreeClassifier

    tree = DecisionTreeClassifier().fit(*_data("binary"))
    with pytest.raises(ValueError, match="threads: a setting of XGBoost and LightGBM"):
        store.register(tree, "t", settings={"threads": 2})
    store.register(tree, "t")
    with pytest.raises(ValueError, match="threads: a setting of XGBoost and LightGBM"):
        store.configure("t", 1, {"threads": 2})
    with pytest.raises(ValueError, match="threads: 65 is out of range"):
        store.configure("x", 1, {"threads": 65})


@pytest.mark.e2e
def test_a_tampered_or_mismatched_native_artifact_is_refused(
        cases: dict[tuple[str, str, str], Case], tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.register(cases["lightgbm", "txt", "binary"].model, "l", backend="library")
    artifact = tmp_path / "l" / "1" / "booster.txt"
    original = artifact.read_bytes()
    artifact.write_bytes(original.replace(b"shrinkage=1", b"shrinkage=2", 1))
    with pytest.raises(ArtifactRejected, match=r"sha256 mismatch .* refusing to load"):
        store.load_sync("l", 1)
    artifact.write_bytes(original)
    manifest = tmp_path / "l" / "1" / "model.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "classes": [0, 1, 2]}))
    with pytest.raises(ArtifactRejected, match="holds a lightgbm binary sigmoid:1 model"):
        store.load_sync("l", 1)
    manifest.write_text(json.dumps({**data, "format": "json"}))
    with pytest.raises(ArtifactRejected, match="manifest unreadable"):
        store.load_sync("l", 1)


@pytest.mark.e2e
def test_backend_sklearn_serves_the_library_own_predict(
        cases: dict[tuple[str, str, str], Case], tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    m = store.register(cases["xgboost", "json", "binary"].model, "x", backend="sklearn")
    assert "via" not in m.backends["xgboost"]  # the library's own predict serves
    assert not m.choice
    loaded = store.load_sync("x", 1)
    assert loaded.booster is None and loaded.chosen == {}


# -- the command line: registration and bad input ------------------------------------------------
@pytest.mark.e2e
def test_cli_registers_native_files_and_wrappers(
        cases: dict[tuple[str, str, str], Case], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "store"
    ubj = cases["xgboost", "ubj", "multiclass"].model
    assert cli(["register", str(ubj), "--name", "x", "--classes", "a,b,c", "--threads", "2",
                "--backend", "library", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "family=xgboost format=ubj objective=multi:softprob" in out
    assert "backend=Booster.inplace_predict label=verified(mismatches=0" in out
    m = ModelStore(root).manifest("x", 1)
    assert m.classes == ("a", "b", "c") and m.settings.threads == 2
    wrapper = tmp_path / "w.joblib"
    joblib.dump(cases["lightgbm", "joblib", "regression"].model, wrapper)
    assert cli(["register", str(wrapper), "--name", "w", "--backend", "library",
                "--root", str(root)]) == 0
    txt = tmp_path / "model.bin"
    txt.write_bytes(cases["lightgbm", "txt", "binary"].model.read_bytes())
    assert cli(["register", str(txt), "--format", "txt", "--name", "t", "--classes", "0,1",
                "--backend", "library", "--root", str(root)]) == 0
    assert ModelStore(root).manifest("t", 1).classes == (0, 1)
    capsys.readouterr()
    assert cli(["list", "--root", str(root)]) == 0
    listing = capsys.readouterr().out
    assert "w\tv1\tregression" in listing and "family=lightgbm format=joblib" in listing


def _xgb_json(case: Case, change: Callable[[dict[str, Any]], None]) -> bytes:
    doc = json.loads(case.model.read_bytes())
    change(doc)
    return json.dumps(doc).encode()


BAD_FILES: list[Any] = [
    # not a model of the kind its suffix (or --format) names
    ("not-xgboost.json", "", lambda c: b'{"a": 1}', "not an XGBoost JSON model"),
    ("lightgbm-as.json", "", lambda c: c["lightgbm", "txt", "binary"].model.read_bytes(),
     "not an XGBoost JSON model (not JSON"),
    ("csv.txt", "", lambda c: b"1,2,3\n4,5,6\n", "not a LightGBM text model"),
    ("json-as.txt", "", lambda c: c["xgboost", "json", "binary"].model.read_bytes(),
     "not a LightGBM text model"),
    ("noise.ubj", "", lambda c: bytes(range(256)) * 4, "not an XGBoost UBJSON model"),
    ("json-as-ubj.bin", "ubj", lambda c: c["xgboost", "json", "binary"].model.read_bytes(),
     "not an XGBoost UBJSON model"),
    ("ranker.json", "", lambda c: _xgb_json(c["xgboost", "json", "binary"], lambda d: d[
        "learner"]["objective"].update(name="rank:pairwise")),
     "objective rank:pairwise is not served"),
    # damaged: the library would crash on these, they never reach it
    ("truncated.ubj", "", lambda c: c["xgboost", "ubj", "binary"].model.read_bytes()[:-100],
     "not a complete XGBoost UBJSON model"),
    ("truncated.txt", "", lambda c: _truncated(c["lightgbm", "txt", "multiclass"].model),
     "not a complete LightGBM text model"),
    ("truncated.json", "", lambda c: c["xgboost", "json", "binary"].model.read_bytes()[:-10],
     "not an XGBoost JSON model (not JSON"),
    ("bad-child.json", "", lambda c: _xgb_json(c["xgboost", "json", "binary"], lambda d: d[
        "learner"]["gradient_booster"]["model"]["trees"][0]["left_children"].__setitem__(
        0, 99)), "damaged XGBoost model (tree 0: child or feature index out of range)"),
    # complete, but the installed library cannot load it (found in the child process)
    pytest.param("future.json", "", lambda c: _xgb_json(c["xgboost", "json", "regression"],
                                                        lambda d: d["learner"]["objective"]
                                                        .update(name="reg:future")),
                 f"xgboost {xgb.__version__} cannot load it: Unknown objective function: "
                 "`reg:future`", marks=pytest.mark.e2e, id="future.json"),
    pytest.param("sigmoid.txt", "", lambda c: c["lightgbm", "txt", "binary"].model.read_bytes()
                 .replace(b"sigmoid:1", b"sigmoid:-1"),
                 f"lightgbm {lgb.__version__} cannot load it: ", marks=pytest.mark.e2e,
                 id="sigmoid.txt"),
]


def _truncated(path: Path) -> bytes:
    data = path.read_bytes()
    return data[:data.index(b"\nTree=2\n") + 40]


@pytest.mark.parametrize(("name", "fmt", "content", "reason"), [
    b if hasattr(b, "marks") else pytest.param(*b, id=b[0]) for b in BAD_FILES])
def test_a_bad_booster_file_is_one_line_exit_2_and_nothing_written(
        cases: dict[tuple[str, str, str], Case], tmp_path: Path,
        capsys: pytest.CaptureFixture[str], name: str, fmt: str,
        content: Callable[[dict[tuple[str, str, str], Case]], bytes], reason: str) -> None:
    path = tmp_path / name
    path.write_bytes(content(cases))
    root = tmp_path / "store"
    args = ["register", str(path), "--name", "m", "--root", str(root)]
    assert cli(args + (["--format", fmt] if fmt else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: {reason}"), err
    assert err.count("\n") == 1
    assert not root.exists()
    with pytest.raises(BoosterError):  # and the store's own door refuses it the same way
        ModelStore(root).register(path, "m", format=fmt or None)  # type: ignore[arg-type]
    assert not root.exists() or list(root.iterdir()) == []


@pytest.mark.parametrize(("family", "fmt"), [("xgboost", "json"), ("xgboost", "ubj"),
                                              ("lightgbm", "txt"), ("xgboost", "joblib"),
                                              ("lightgbm", "joblib")])
def test_a_feature_count_that_does_not_match_is_exit_2(
        cases: dict[tuple[str, str, str], Case], tmp_path: Path,
        capsys: pytest.CaptureFixture[str], family: str, fmt: str) -> None:
    case = cases[family, fmt, "binary"]
    path = case.model if fmt != "joblib" else tmp_path / "m.joblib"
    if fmt == "joblib":
        joblib.dump(case.model, path)
    root = tmp_path / "store"
    assert cli(["register", str(path), "--name", "m", "--features", "a,b,c",
                "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {path}: the model has {N_FEATURES} features, --features names 3\n"
    assert cli(["register", str(path), "--name", "m", "--classes", "a,b,c",
                "--root", str(root)]) == 2
    assert "the model has 2 classes, --classes names 3" in capsys.readouterr().err
    assert not root.exists()


def test_a_wrapper_with_an_objective_that_is_not_served_is_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x, y = _data("multiclass")
    ova = lgb.LGBMClassifier(n_estimators=5, objective="multiclassova", verbose=-1).fit(x, y)
    path = tmp_path / "ova.joblib"
    joblib.dump(ova, path)
    assert cli(["register", str(path), "--name", "m", "--root", str(tmp_path / "s")]) == 2
    assert "objective multiclassova is not served" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


# -- the readers ------------------------------------------------------------------------------
def test_ubjson_and_json_files_describe_the_same_model(
        cases: dict[tuple[str, str, str], Case]) -> None:
    for task in TASKS:
        _, a = fam.read_native(cases["xgboost", "json", task].model.read_bytes(), "json")
        _, b = fam.read_native(cases["xgboost", "ubj", task].model.read_bytes(), "ubj")
        assert (a.objective, a.task, a.n_features, a.n_classes) == (
            b.objective, b.task, b.n_features, b.n_classes)
        assert len(a.splits) == len(b.splits) == TREES * (3 if task == "multiclass" else 1)
        for (fa, ta), (fb, tb) in zip(a.splits, b.splits, strict=True):
            assert np.array_equal(fa, fb) and np.array_equal(ta.astype(np.float32),
                                                             tb.astype(np.float32))


@pytest.mark.parametrize("fmt", ["ubj", "txt"])
def test_every_truncation_is_refused_before_the_library_sees_it(
        cases: dict[tuple[str, str, str], Case], fmt: str) -> None:
    family = "xgboost" if fmt == "ubj" else "lightgbm"
    data = cases[family, fmt, "multiclass"].model.read_bytes()
    # A LightGBM file may end after its trees or its parameters (the rest is optional), but
    # not inside its parameters, where lightgbm 4.7 crashes.
    complete = len(data) if fmt == "ubj" else data.index(b"\nend of trees") + 13
    for cut in [*np.linspace(1, len(data) - 1, 80).astype(int),
                *range(complete, len(data), 7)]:
        if cut < complete:
            with pytest.raises(BoosterError):
                fam.read_native(data[:cut], fmt)  # type: ignore[arg-type]
        else:
            with contextlib.suppress(BoosterError):  # and no crash
                fam.read_native(data[:cut], fmt)  # type: ignore[arg-type]


# -- packaging ---------------------------------------------------------------------------------
@pytest.mark.e2e
def test_neither_library_is_imported_with_the_gateway_or_the_store() -> None:
    code = ("import sys, gateway, gateway.app, model_store, model_store.__main__, "
            "model_store.boosters; bad = [m for m in ('xgboost', 'lightgbm') if m in "
            "sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_extras_are_locked_for_dev_and_for_serving() -> None:
    def pins(name: str) -> set[str]:
        text = (ROOT / "requirements" / name).read_text()
        return {line.split("==")[0] for line in text.splitlines() if "==" in line}

    extras = {"xgboost-cpu", "lightgbm", "treelite", "tl2cgen", "onnxmltools"}
    assert extras <= pins("dev.lock")
    assert extras <= pins("runtime.lock")  # the image serves boosters and their compiled C
    assert "xgboost" not in pins("runtime.lock")  # the CPU build only
