"""The Open Inference Protocol against a real uvicorn process, through the official
``tritonclient.http`` client, unchanged; plus hostile binary bodies over raw HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.support import uvicorn_process

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(session_store: Path) -> Any:
    with uvicorn_process({"GATEWAY_MODEL_ROOT": str(session_store)}) as base:
        yield base


def client_for(base: str) -> Any:
    return httpclient.InferenceServerClient(base.removeprefix("http://"))


def test_health_metadata_and_all_iris_rows_binary(server: str, iris_rows: np.ndarray,
                                                  iris_estimator: Any) -> None:
    client = client_for(server)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("iris") and client.is_model_ready("iris", "1")
    assert not client.is_model_ready("nope")
    meta = client.get_server_metadata()
    assert "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata("iris")
    assert model["versions"] == ["1"]
    assert model["inputs"] == [{"name": "input", "datatype": "FP64", "shape": [-1, 4]}]
    assert [o["name"] for o in model["outputs"]] == ["label", "probabilities"]

    inp = httpclient.InferInput("input", list(iris_rows.shape), "FP64")
    inp.set_data_from_numpy(iris_rows)  # binary by default
    result = client.infer("iris", [inp], request_id="all-150")
    labels = [b.decode() for b in result.as_numpy("label")]
    assert labels == iris_estimator.predict(iris_rows).tolist()
    assert np.allclose(result.as_numpy("probabilities"), iris_estimator.predict_proba(iris_rows))
    assert result.get_response()["id"] == "all-150"


def test_example_script_infers_all_iris_rows(server: str) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "examples" / "tritonclient_iris.py"),
                           server.removeprefix("http://")], capture_output=True, text=True,
                          timeout=120, check=False, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "150/150 labels equal scikit-learn's" in proc.stdout


def test_json_inputs_and_outputs_and_requested_outputs(server: str, random_rows: np.ndarray,
                                                       iris_estimator: Any) -> None:
    client = client_for(server)
    rows = random_rows[:40].astype(np.float32)
    inp = httpclient.InferInput("input", list(rows.shape), "FP32")
    inp.set_data_from_numpy(rows, binary_data=False)
    out = httpclient.InferRequestedOutput("label", binary_data=False)
    result = client.infer("iris", [inp], outputs=[out], model_version="1")
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["label"]
    assert [b.decode() if isinstance(b, bytes) else b for b in result.as_numpy("label")] == \
        iris_estimator.predict(rows).tolist()


def test_v2_answers_equal_v1(server: str, random_rows: np.ndarray) -> None:
    rows = random_rows[100:120]
    v1 = httpx.post(f"{server}/v1/models/iris/predict",
                    json={"instances": rows.tolist(), "probabilities": True}).json()
    client = client_for(server)
    inp = httpclient.InferInput("input", list(rows.shape), "FP64")
    inp.set_data_from_numpy(rows)
    result = client.infer("iris", [inp])
    assert [b.decode() for b in result.as_numpy("label")] == v1["predictions"]
    assert result.as_numpy("probabilities").tolist() == v1["probabilities"]


def test_unknown_model_raises_with_the_server_message(server: str) -> None:
    client = client_for(server)
    inp = httpclient.InferInput("input", [1, 4], "FP64")
    inp.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2]]))
    with pytest.raises(InferenceServerException, match="model 'nope' is not loaded"):
        client.infer("nope", [inp])
    with pytest.raises(InferenceServerException, match="has no version 7"):
        client.infer("iris", [inp], model_version="7")


def _raw(rows: np.ndarray, size: int | None = None) -> tuple[bytes, int]:
    data = rows.tobytes()
    header = orjson.dumps({"inputs": [{"name": "input", "shape": list(rows.shape),
                                       "datatype": "FP64",
                                       "parameters": {"binary_data_size":
                                                      len(data) if size is None else size}}]})
    return header + data, len(header)


@pytest.mark.parametrize("case", ["lying size", "truncated", "header past end", "huge size",
                                  "garbage header"])
def test_hostile_binary_bodies_get_400_and_server_stays_ready(server: str, case: str) -> None:
    rows = np.array([[5.1, 3.5, 1.4, 0.2], [6.0, 3.0, 5.0, 2.0]])
    body, hl = _raw(rows)
    if case == "lying size":
        body, hl = _raw(rows, size=8)
    elif case == "truncated":
        body = body[:-9]
    elif case == "header past end":
        hl = len(body) + 100
    elif case == "huge size":
        body, hl = _raw(rows, size=2**62)
    elif case == "garbage header":
        body = b"\xff\x00garbage" + body[hl:]
        hl = 9
    r = httpx.post(f"{server}/v2/models/iris/infer", content=body,
                   headers={"Inference-Header-Content-Length": str(hl)})
    assert r.status_code == 400, r.text
    assert isinstance(r.json()["error"], str) and r.json()["error"]
    assert httpx.get(f"{server}/v2/health/ready").status_code == 200
