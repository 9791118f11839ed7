"""Every common estimator, registered and served by an in-process gateway, answers as the
estimator does: labels exactly, probabilities and values within the manifest's tolerance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gateway import Settings, create_app
from model_store import ModelStore
from model_store.compiled import verification_rows
from model_store.estimators import catalogue, main, max_difference, register_all
from tests.support import serve

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

# Served by scikit-learn on purpose: histogram gradient boosting compares in float64, and the
# float32 ONNX-ML tree operators change labels next to its thresholds (the manifest says so).
STAYS_ON_SKLEARN = {"hgb-clf", "hgb-reg", "scaled-hgb-clf", "scaled-hgb-reg"}


async def test_the_gateway_answers_as_each_estimator(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    registered = register_all(store, catalogue(trees=5))
    assert len(registered) == 26
    table = []
    app = create_app(Settings(model_root=tmp_path))
    async with serve(app) as client:
        for r in registered:
            name, m = r.entry.name, r.manifest
            generated = verification_rows(r.estimator, r.rows.shape[1], generated=300, seed=9)
            rows = np.vstack([r.rows, generated])[:1024]
            classifier = m.task == "classification"
            response = await client.post(f"/v1/models/{name}/predict", json={
                "instances": rows.tolist(), "probabilities": classifier})
            assert response.status_code == 200, response.text
            body = response.json()
            onnx = m.backends["onnx"]
            served = {o: "onnx" if c["verified"] else "sklearn"
                      for o, c in onnx["checks"].items()}
            assert served["label"] == ("sklearn" if name in STAYS_ON_SKLEARN else "onnx"), (
                name, onnx["checks"])
            want = r.estimator.predict(rows)
            if classifier:
                assert body["predictions"] == want.tolist(), name
                proba = np.asarray(body["probabilities"])
                atol = onnx["checks"]["probabilities"]["atol"] if served[
                    "probabilities"] == "onnx" else 0.0
                assert np.max(np.abs(proba - r.estimator.predict_proba(rows))) <= atol, name
            else:
                got = np.asarray(body["predictions"], dtype=np.float64)
                check = onnx["checks"]["label"]
                bound = check["rtol"] * max(1.0, float(np.max(np.abs(want))))
                if served["label"] == "sklearn":
                    bound = 0.0
                assert np.max(np.abs(got - want)) <= bound, name
            what, diff = max_difference(m)
            table.append(f"{r.entry.title:<48} {served['label']:<8} {onnx.get('input', '-'):<16}"
                         f" {what} {diff:.1g}")
    print("\n".join(table))


def test_the_table_script_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--trees", "3", "--calls", "3", "--repetitions", "1",
                 "--only", "rf-clf,linreg,scaled-hgb-reg"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + 3
    assert lines[2].startswith("| RandomForestClassifier | wine | label onnx, probabilities onnx"
                               " | float64 |")
    assert "| LinearRegression | diabetes | value onnx | float64 |" in lines[3]
    assert "| StandardScaler + HistGradientBoostingRegressor | diabetes | value sklearn |" \
        in lines[4] and "not served" in lines[4] and "µs (sklearn) |" in lines[4]
