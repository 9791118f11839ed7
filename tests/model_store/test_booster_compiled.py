"""The compiled candidates of XGBoost and LightGBM models (ONNX through onnxmltools, Treelite +
TL2cgen compiled with the machine's C compiler): built, verified per output, measured and
chosen; what serves answers as the library does; a candidate that fails is refused with its
reason; compiled artifacts are checked at load; a booster file that crashes its library is
refused at registration, through a child process.

Nothing here asserts which candidate is faster: the choice is checked against the measurements
the manifest records, not against the clock. Tests that build a candidate or register a
booster file start a child Python (``model_store.child``), hence ``e2e``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model_store import ArtifactRejected, ModelStore, child, store
from model_store import boosters as fam
from model_store.__main__ import main as cli
from model_store.booster_compiled import SIZES, choose, score_us
from model_store.compiled import CompileError, OutputCheck
from tests.model_store.booster_cases import Case
from tests.model_store.booster_cases import case_keys as _cases
from tests.model_store.booster_cases import rows as _rows

TASKS = "tests.model_store.child_tasks"


def _same_as_the_library(case: Case, answers: Any, record: dict[str, Any],
                         rows: np.ndarray) -> None:
    """0 wrong answers on ``rows``: labels exactly, probabilities within the atol the
    manifest states, values within its rtol times the largest value (at least 1)."""
    labels, proba = answers
    want = case.labels(rows)
    if case.task == "regression":
        scale = max(1.0, float(np.max(np.abs(want))))
        rtol = record["checks"]["label"]["rtol"]
        assert np.max(np.abs(np.asarray(labels, dtype=float) - want)) <= rtol * scale
        return
    assert np.asarray(labels).tolist() == want.tolist()
    assert case.proba is not None
    atol = record["checks"]["probabilities"]["atol"]
    assert np.max(np.abs(np.asarray(proba) - case.proba(rows))) <= atol


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("candidate", ["treelite", "onnx"])
@pytest.mark.parametrize(("family", "fmt", "task"), _cases())
def test_each_candidate_serves_what_it_verifies_with_no_wrong_answer(
        cases: dict[tuple[str, str, str], Case], tmp_path: Path, family: str, fmt: str,
        task: str, candidate: str) -> None:
    case = cases[family, fmt, task]
    st = ModelStore(tmp_path)
    m = st.register(case.model, "m", backend=candidate)  # type: ignore[arg-type]
    record = m.backends[candidate]
    assert "checks" in record, record  # it was built
    outputs = ["label"] if task == "regression" else ["label", "probabilities"]
    verified = [o for o in outputs if record["checks"][o]["verified"]]
    if candidate == "treelite" or family == "xgboost":  # same thresholds' type as the library
        assert verified == outputs, record["checks"]
    assert m.choice["outputs"] == {o: candidate if o in verified else family for o in outputs}
    assert set(m.choice["measured"]) == ({family, candidate} if verified else {family})
    if set(verified) != set(outputs):
        assert m.choice["refused"][candidate].startswith(candidate)
    if verified:  # its artifact sits in the version's directory, with its sha256
        data = (tmp_path / "m" / "1" / record["artifact"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == record["sha256"]

    model = st.load_sync("m", 1)
    assert model.backends() == m.choice["outputs"]
    rows = _rows(case)
    proba = None if task == "regression" else model.predict_proba(rows)
    _same_as_the_library(case, (model.predict(rows), proba), record, rows)
    if task != "regression":
        labels, both = model.predict_both(rows)
        _same_as_the_library(case, (labels, both), record, rows)
    if verified:  # and the candidate itself, not only what the manifest let it serve
        _same_as_the_library(case, model.chosen[candidate].run(rows), record, rows)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize(("family", "fmt"), [("xgboost", "ubj"), ("lightgbm", "joblib")])
def test_auto_serves_the_fastest_verified_as_measured(
        cases: dict[tuple[str, str, str], Case], tmp_path: Path, family: str,
        fmt: str) -> None:
    case = cases[family, fmt, "multiclass"]
    st = ModelStore(tmp_path)
    m = st.register(case.model, "m")
    choice = m.choice
    assert choice["rule"] and choice["threads"] == 1 and choice["rounds"] >= 1
    checks = {c: {o: OutputCheck.from_json(v) for o, v in m.backends[c]["checks"].items()}
              for c in ("onnx", "treelite") if "checks" in m.backends[c]}
    verified = {c for c, cs in checks.items() if any(v.verified for v in cs.values())}
    assert set(choice["measured"]) == {family} | verified
    for figures in choice["measured"].values():
        assert set(figures) == {str(n) for n in SIZES}
        for f in figures.values():
            assert 0 < f["min_us"] <= f["median_us"] <= f["max_us"]
    # What was chosen is what the recorded figures and checks choose.
    assert choice["outputs"] == choose(family, ["label", "probabilities"], checks,
                                       choice["measured"])
    for candidate, reason in choice["refused"].items():
        assert reason, candidate
    model = st.load_sync("m", 1)
    assert model.backends() == choice["outputs"]
    rows = _rows(case)
    labels, proba = model.predict_both(rows)
    _same_as_the_library(case, (labels, proba), m.backends[family], rows)


def _check(verified: bool) -> OutputCheck:
    return OutputCheck(verified, 10, 0 if verified else 1, 0.0, 1e-6)


def _figures(one: float, many: float) -> dict[str, dict[str, float]]:
    return {"1": {"median_us": one, "min_us": one, "max_us": one},
            "64": {"median_us": many, "min_us": many, "max_us": many}}


def test_choose_takes_the_least_one_plus_sixty_four_row_time_among_the_verified() -> None:
    measured = {"xgboost": _figures(300, 1000), "onnx": _figures(20, 1100),
                "treelite": _figures(30, 1000)}
    both = {"label": _check(True), "probabilities": _check(True)}
    assert score_us(measured["treelite"]) == 1030
    assert choose("xgboost", ["label", "probabilities"], {"onnx": both, "treelite": both},
                  measured) == {"label": "treelite", "probabilities": "treelite"}
    # per output: a candidate serves only what it verified
    half = {"label": _check(True), "probabilities": _check(False)}
    assert choose("xgboost", ["label", "probabilities"], {"onnx": both, "treelite": half},
                  measured) == {"label": "treelite", "probabilities": "onnx"}
    # none faster, or none verified: the library; a tie goes to the library
    slow = {**measured, "xgboost": _figures(10, 500)}
    assert choose("xgboost", ["label"], {"treelite": both}, slow) == {"label": "xgboost"}
    assert choose("xgboost", ["label"], {"treelite": {"label": _check(False)}},
                  measured) == {"label": "xgboost"}
    tie = {**measured, "xgboost": _figures(30, 1000)}
    assert choose("xgboost", ["label"], {"treelite": both}, tie) == {"label": "xgboost"}
    # a candidate that was not measured is not chosen
    assert choose("xgboost", ["label"], {"treelite": both},
                  {"xgboost": measured["xgboost"]}) == {"label": "xgboost"}


@pytest.mark.e2e
def test_a_candidate_that_fails_is_refused_with_its_reason_not_the_registration(
        cases: dict[tuple[str, str, str], Case], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    st = ModelStore(tmp_path)
    wrapper = cases["xgboost", "joblib", "binary"].model
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    m = st.register(wrapper, "cc-fails")
    assert m.backends["treelite"] == {"error": m.choice["refused"]["treelite"]}
    false = shutil.which("false")
    assert m.choice["refused"]["treelite"] == f"{false} failed (exit status 1)"
    assert "treelite" not in m.choice["measured"]
    assert set(m.choice["outputs"].values()) <= {"onnx", "xgboost"}
    assert st.load_sync("cc-fails", 1).predict(np.zeros((2, 10))) == wrapper.predict(
        np.zeros((2, 10))).tolist()

    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    m = st.register(wrapper, "no-cc")
    assert m.choice["refused"]["treelite"] == f"no C compiler: {tmp_path / 'no-such-cc'} is " \
                                              "not on PATH"
    monkeypatch.delenv("CC")

    m = st.register(wrapper, "slow", compile_timeout_s=0.01)  # the compiler's time is bounded
    assert m.choice["refused"]["treelite"] == "the build took longer than 0.01 s and was stopped"

    # asked for by name, a candidate that cannot be built fails the registration: nothing
    # written
    monkeypatch.setenv("CC", "false")
    with pytest.raises(CompileError, match=rf"^treelite: {false} failed \(exit status 1\)$"):
        st.register(wrapper, "forced", backend="treelite")
    assert "forced" not in st.models() and not (tmp_path / "forced").exists()


@pytest.mark.e2e
def test_compiled_artifacts_are_checked_before_they_serve(
        cases: dict[tuple[str, str, str], Case], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    st = ModelStore(tmp_path)
    binary = cases["lightgbm", "joblib", "binary"].model
    m = st.register(binary, "m", backend="treelite")
    other = st.register(cases["lightgbm", "joblib", "multiclass"].model, "other",
                        backend="treelite")
    assert m.choice["outputs"] == {"label": "treelite", "probabilities": "treelite"}
    vdir = tmp_path / "m" / "1"
    lib = vdir / m.backends["treelite"]["artifact"]
    original = lib.read_bytes()

    lib.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # tampered
    with pytest.raises(ArtifactRejected, match="sha256 mismatch with the manifest"):
        st.load_sync("m", 1)
    lib.unlink()  # missing
    with pytest.raises(ArtifactRejected, match="unreadable"):
        st.load_sync("m", 1)

    def recorded(data: bytes) -> None:  # the file and the manifest agree again
        lib.write_bytes(data)
        manifest = json.loads((vdir / "model.json").read_text())
        manifest["backends"]["treelite"]["sha256"] = hashlib.sha256(data).hexdigest()
        (vdir / "model.json").write_text(json.dumps(manifest))

    # a library of another model: it loads, and verifying it again refuses it
    recorded((tmp_path / "other" / "1" / other.backends["treelite"]["artifact"]).read_bytes())
    with caplog.at_level(logging.WARNING, logger="model_store"):
        loaded = st.load_sync("m", 1)
    assert loaded.backends() == {"label": "lightgbm", "probabilities": "lightgbm"}
    assert "treelite not loaded" in caplog.text or "not verified again" in caplog.text
    rows = np.random.default_rng(0).normal(size=(50, 10))
    assert loaded.predict(rows) == binary.predict(rows).tolist()
    # not a shared library at all
    caplog.clear()
    recorded(b"not an ELF file")
    with caplog.at_level(logging.WARNING, logger="model_store"):
        loaded = st.load_sync("m", 1)
    assert loaded.backends()["label"] == "lightgbm" and "tl2cgen cannot load it" in caplog.text
    recorded(original)
    assert st.load_sync("m", 1).backends()["label"] == "treelite"


@pytest.mark.e2e
def test_one_compiled_library_answers_concurrent_calls(
        cases: dict[tuple[str, str, str], Case], tmp_path: Path) -> None:
    """TL2cgen's PredictBatch keeps no state between calls (re-check when tl2cgen changes)."""
    st = ModelStore(tmp_path)
    st.register(cases["lightgbm", "txt", "multiclass"].model, "m", backend="treelite",
                settings={"threads": 2})
    model = st.load_sync("m", 1)
    compiled = model.chosen["treelite"]
    rows = _rows(cases["lightgbm", "txt", "multiclass"], 512)
    want = compiled.run(rows)[1]
    assert compiled.run(rows[:1])[1] is not None  # fewer rows than threads
    results: list[bool] = []
    start = threading.Barrier(4)

    def calls() -> None:
        start.wait()
        results.extend(np.array_equal(compiled.run(rows)[1], want) for _ in range(20))

    threads = [threading.Thread(target=calls) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 80


@pytest.mark.e2e
@pytest.mark.slow
def test_compile_chooses_again_and_removes_what_the_manifest_no_longer_names(
        cases: dict[tuple[str, str, str], Case], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    st = ModelStore(tmp_path)
    st.register(cases["xgboost", "json", "regression"].model, "m", backend="library")
    vdir = tmp_path / "m" / "1"
    stale = vdir / "compiled-0000000000000000.so"
    stale.write_bytes(b"an earlier choice")
    assert cli(["compile", "m", "1", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("compiled m v1") and "served=label:" in out
    m = st.manifest("m", 1)
    assert set(m.choice["measured"]) >= {"xgboost"} and {"onnx", "treelite"} <= set(m.backends)
    assert not stale.exists()
    kept = {b["artifact"] for b in m.backends.values() if "artifact" in b}
    assert {p.name for p in vdir.glob("compiled-*")} == kept
    case = cases["xgboost", "json", "regression"]
    rows = _rows(case)
    _same_as_the_library(case, (st.load_sync("m", 1).predict(rows), None), m.backends["xgboost"],
                         rows)


# -- a file that crashes its library ----------------------------------------------------------
@pytest.mark.e2e
def test_a_crash_of_the_library_at_registration_is_one_line_exit_2_and_nothing_written(
        cases: dict[tuple[str, str, str], Case], tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # The child that loads the file dies of SIGABRT, as lightgbm does on some damaged files.
    monkeypatch.setattr(store, "PROBE_TASK", f"{TASKS}:abort")
    path = cases["xgboost", "ubj", "binary"].model
    root = tmp_path / "store"
    assert cli(["register", str(path), "--name", "m", "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {path}: xgboost crashed (killed by SIGABRT) loading it or "
                   "predicting with it\n")
    assert not root.exists()


@pytest.mark.e2e
@pytest.mark.slow
def test_a_child_answers_refuses_crashes_or_is_stopped_with_what_it_started(
        tmp_path: Path) -> None:
    assert child.run(f"{TASKS}:answer", {"value": 21}, timeout_s=60) == {"value": 42}
    with pytest.raises(child.ChildFailed) as refused:
        child.run(f"{TASKS}:refuse", {"why": "not a model"}, timeout_s=60)
    assert str(refused.value) == "not a model"
    assert not refused.value.crashed and not refused.value.timed_out
    with pytest.raises(child.ChildFailed, match=r"crashed \(killed by SIGABRT\)") as crashed:
        child.run(f"{TASKS}:abort", {}, timeout_s=60)
    assert crashed.value.crashed
    with pytest.raises(child.ChildFailed,
                       match=r"failed \(exit status 1\): RuntimeError: a bug, not a refusal"):
        child.run(f"{TASKS}:fail", {}, timeout_s=60)
    pid_file = tmp_path / "pid"  # the limit leaves a loaded machine time to start the child
    with pytest.raises(child.ChildFailed, match="took longer than 15 s") as stopped:
        child.run(f"{TASKS}:hang", {"pid_file": str(pid_file)}, timeout_s=15)
    assert stopped.value.timed_out
    grandchild = int(pid_file.read_text())
    status = Path(f"/proc/{grandchild}/status")
    assert not status.exists() or "\nState:\tZ" in status.read_text()  # killed with its group


def test_a_native_file_is_inspected_without_its_library(
        cases: dict[tuple[str, str, str], Case]) -> None:
    for (family, fmt, task), case in cases.items():
        if fmt == "joblib":
            continue
        info = fam.inspect_native(case.model.read_bytes(), fmt)  # type: ignore[arg-type]
        assert (info.family, info.task == "regression") == (family, task == "regression")
        assert not info.categorical


@pytest.mark.e2e
def test_treelite_reads_values_within_1e_35_of_zero_as_lightgbm_does(tmp_path: Path) -> None:
    import lightgbm as lgb

    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 10))
    x[rng.random(x.shape) < 0.3] = 0.0  # exact zeros: LightGBM splits at -1e-35 between
    y = (x[:, 0] + x[:, 1] > 0).astype(int)  # the negatives and them
    booster = lgb.train({"objective": "binary", "num_leaves": 8, "verbose": -1},
                        lgb.Dataset(x, label=y), 20)
    zero = float(np.float32(1e-35))
    assert any(np.any(np.abs(t) == zero) for _, t in fam.describe(booster, "lightgbm").splits)
    st = ModelStore(tmp_path)
    m = st.register(booster, "m", backend="treelite")  # verified on rows at those thresholds
    assert m.choice["outputs"] == {"label": "treelite", "probabilities": "treelite"}, m.choice
    rows = np.zeros((5, 10))
    rows[:, :2] = [[-zero, -zero], [zero, -zero], [-1e-36, 1e-36], [-zero * 2, zero * 2],
                   [1.0, -zero]]
    p = booster.predict(rows)
    got = np.asarray(st.load_sync("m", 1).predict_proba(rows))
    assert np.max(np.abs(got - np.column_stack([1 - p, p]))) <= 1e-12


@pytest.mark.e2e
def test_models_with_categorical_splits_get_no_compiled_candidate(tmp_path: Path) -> None:
    import lightgbm as lgb

    rng = np.random.default_rng(0)
    x = np.column_stack([rng.integers(0, 5, 600), rng.normal(size=600)])
    y = ((x[:, 0] == 2) | (x[:, 1] > 1)).astype(int)
    booster = lgb.train({"objective": "binary", "verbose": -1, "min_data_per_group": 5,
                         "cat_smooth": 1}, lgb.Dataset(x, label=y, categorical_feature=[0]),
                        10)
    m = ModelStore(tmp_path).register(booster, "cat")
    assert m.choice["outputs"] == {"label": "lightgbm", "probabilities": "lightgbm"}
    assert all("categorical splits" in why for why in m.choice["refused"].values())
    assert set(m.choice["refused"]) == {"onnx", "treelite"}
