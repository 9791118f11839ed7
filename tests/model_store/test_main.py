"""The model store's command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from model_store import ModelSettings, ModelStore
from model_store.__main__ import _parser
from model_store.__main__ import main as cli
from model_store.demo import IRIS_FEATURES, iris_data


def test_cli_train_register_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "store"
    assert cli(["--root", str(root), "train-demo"]) == 0
    assert cli(["train-demo", "--root", str(root), "--if-absent"]) == 0
    assert cli(["train-demo", "--root", str(root), "--if-empty"]) == 0  # the former name
    assert ModelStore(root).models() == {"iris": [1]}
    # another model in the store: iris is still absent from a new one, and trained there
    other = tmp_path / "other"
    assert cli(["--root", str(other), "train-demo", "--name", "first"]) == 0
    assert cli(["--root", str(other), "train-demo", "--if-absent"]) == 0
    assert ModelStore(other).models() == {"first": [1], "iris": [1]}
    x, y = iris_data()
    pkl = tmp_path / "lr.joblib"
    joblib.dump(LogisticRegression(max_iter=500).fit(x, y), pkl)
    assert cli(["--root", str(root), "register", str(pkl), "--name", "lr",
                "--features", ",".join(IRIS_FEATURES)]) == 0
    assert cli(["register", str(pkl), "--name", "lr", "--version", "1", "--root",
                str(root)]) == 1
    capsys.readouterr()
    assert cli(["list", "--root", str(root)]) == 0  # the option after the command
    out = capsys.readouterr().out
    assert "iris\tv1\tclassification" in out and "lr\tv1" in out
    loaded = ModelStore(root).load_sync("iris", 1)
    assert loaded.predict(np.array([[5.1, 3.5, 1.4, 0.2]])) == ["setosa"]


def _actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                out.append(choice)
            for sub in action.choices.values():
                out.extend(_actions(sub))
        else:
            out.append(action)
    return out


def test_every_command_and_option_has_help() -> None:
    missing = [a.dest for a in _actions(_parser()) if not a.help]
    assert missing == []


@pytest.mark.parametrize(("content", "message"), [
    (b"not a pickle\n", "not a joblib file of an estimator (it is text)"),
    (b"", "not a joblib file of an estimator (the file is empty)"),
    (b"a,b,c,d\n5.1,3.5,1.4,0.2\n", "not a joblib file of an estimator (it is comma-separated "
                                     "text: rows to verify with go in --train-rows"),
    (b'{"learner": {}}', "not a joblib file of an estimator (it is JSON: an XGBoost model "
                         "saved by Booster.save_model is registered with --format json)"),
    (42, "holds an object of type int, not an estimator (no predict method)"),
    (StandardScaler().fit(iris_data()[0]), "holds an object of type StandardScaler, not an "
                                           "estimator (no predict method)"),
    (LogisticRegression(), "LogisticRegression is not fitted"),
])
def test_a_file_that_is_not_a_fitted_estimator_gets_one_line_and_status_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], content: object,
        message: str) -> None:
    path = tmp_path / "thing.joblib"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        joblib.dump(content, path)
    assert cli(["register", str(path), "--name", "x", "--root", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: {message}") and err.count("\n") == 1
    assert cli(["register", str(tmp_path / "absent.joblib"), "--name", "x"]) == 2
    assert "cannot read: No such file or directory" in capsys.readouterr().err


@pytest.fixture
def lr_file(tmp_path: Path) -> Path:
    x, y = iris_data()
    path = tmp_path / "lr.joblib"
    joblib.dump(LogisticRegression(max_iter=1000).fit(x, y), path)
    return path


@pytest.mark.parametrize("suffix", [".npy", ".csv", ".csv-header"])
def test_register_verifies_on_training_rows(tmp_path: Path, lr_file: Path,
                                            suffix: str) -> None:
    x = iris_data()[0]
    if suffix == ".npy":
        rows = tmp_path / "rows.npy"
        np.save(rows, x)
    elif suffix == ".csv":
        rows = tmp_path / "rows.csv"
        np.savetxt(rows, x, delimiter=",")
    else:  # a header naming the features, columns in another order
        rows = tmp_path / "rows.csv"
        names = ["f3", "f1", "f0", "f2"]
        np.savetxt(rows, x[:, [3, 1, 0, 2]], delimiter=",", header=",".join(names),
                   comments="")
    root = tmp_path / "m"
    assert cli(["register", str(lr_file), "--name", "lr", "--train-rows", str(rows),
                "--root", str(root)]) == 0
    checks = ModelStore(root).manifest("lr", 1).backends["onnx"]["checks"]
    assert checks["label"]["rows"] == 10_000 + len(x)


def test_unusable_training_rows_get_status_2(tmp_path: Path, lr_file: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "rows.npy"
    np.save(bad, np.zeros((5, 3)))
    assert cli(["register", str(lr_file), "--name", "lr", "--train-rows", str(bad)]) == 2
    assert "expected rows of 4 columns, got shape (5, 3)" in capsys.readouterr().err
    txt = tmp_path / "rows.txt"
    txt.write_text("1,2,3,4\n")
    assert cli(["register", str(lr_file), "--name", "lr", "--train-rows", str(txt)]) == 2
    assert "must be a .npy or .csv file" in capsys.readouterr().err


def test_features_that_disagree_with_the_fitted_names_are_an_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x, y = iris_data()
    est = LogisticRegression(max_iter=1000).fit(x, y)
    est.feature_names_in_ = np.asarray(IRIS_FEATURES, dtype=object)  # as a DataFrame fit sets
    path = tmp_path / "named.joblib"
    joblib.dump(est, path)
    root = tmp_path / "m"
    assert cli(["register", str(path), "--name", "n", "--features", "a,b,c,d",
                "--root", str(root)]) == 1
    assert "disagree with those the estimator was fitted with" in capsys.readouterr().err
    assert cli(["register", str(path), "--name", "n", "--root", str(root)]) == 0
    assert ModelStore(root).manifest("n", 1).features == IRIS_FEATURES


def test_settings_by_register_and_configure(tmp_path: Path, lr_file: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "m"
    assert cli(["register", str(lr_file), "--name", "lr", "--backend", "sklearn",
                "--max-batch-size", "16", "--execution", "thread", "--root", str(root)]) == 0
    store = ModelStore(root)
    assert store.manifest("lr", 1).settings == ModelSettings(max_batch_size=16,
                                                             execution="thread")
    assert cli(["configure", "lr", "1", "--max-batch-delay-us", "200", "--unset", "execution",
                "--root", str(root)]) == 0
    assert capsys.readouterr().out.endswith(
        "lr v1: settings=max_batch_size=16,max_batch_delay_us=200\n")
    manifest = json.loads((root / "lr" / "1" / "model.json").read_text())
    assert manifest["settings"] == {"max_batch_size": 16, "max_batch_delay_us": 200}
    assert cli(["configure", "lr", "1", "--infer-concurrency", "0", "--root", str(root)]) == 1
    assert "infer_concurrency: 0 is out of range (1..64)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli(["configure", "lr", "1", "--execution", "sometimes", "--root", str(root)])
    assert exit_.value.code == 2
    assert cli(["configure", "lr", "2", "--max-batch-size", "4", "--root", str(root)]) == 1


def test_list_says_when_there_is_no_store_or_no_model(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    assert cli(["--root", str(missing), "list"]) == 2
    assert capsys.readouterr().err == f"error: {missing}: no model store there (not a directory)\n"
    assert cli(["--root", str(tmp_path), "list"]) == 0
    out = capsys.readouterr()
    assert out.out == "" and out.err == f"{tmp_path}: no models\n"


def test_a_regressors_output_is_listed_as_its_prediction(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sklearn.linear_model import LinearRegression

    x = iris_data()[0]
    path = tmp_path / "reg.joblib"
    joblib.dump(LinearRegression().fit(x[:, :3], x[:, 3]), path)
    root = str(tmp_path / "m")
    assert cli(["register", str(path), "--name", "width", "--root", root, "--features",
                ",".join(IRIS_FEATURES[:3])]) == 0
    assert cli(["list", "--root", root]) == 0
    out = capsys.readouterr().out
    assert "prediction=" in out and "label=" not in out


def test_backend_names_match_the_gateways() -> None:
    parse = _parser().parse_args
    for name in ("auto", "library", "onnx", "treelite"):
        assert parse(["register", "m.joblib", "--name", "m", "--backend", name]).backend == name
    assert parse(["register", "m.joblib", "--name", "m", "--backend", "sklearn"]).backend == \
        "library"  # the former name
    from gateway.settings import Settings
    assert Settings(backend="library").backend == "library"
