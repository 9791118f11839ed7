"""Open Inference Protocol conformance, in-process: the specification's paths, datatypes,
error shape and response objects (the required fields its REST OpenAPI document lists)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import numpy as np
import pytest
from sklearn.tree import DecisionTreeClassifier

from gateway import Settings, create_app
from model_store import ModelStore
from model_store.demo import IRIS_FEATURES, iris_data
from tests.support import serve

pytestmark = pytest.mark.anyio

# Required fields of the specification's objects (open_inference_rest.yaml), as JSON Schema.
_TENSOR = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
    "name": {"type": "string"}, "datatype": {"type": "string"},
    "shape": {"type": "array", "items": {"type": "integer"}}}}
SERVER_METADATA = {"type": "object", "required": ["name", "version", "extensions"],
                   "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                                  "extensions": {"type": "array",
                                                 "items": {"type": "string"}}}}
MODEL_METADATA = {"type": "object", "required": ["name", "platform"], "properties": {
    "name": {"type": "string"}, "platform": {"type": "string"},
    "versions": {"type": "array", "items": {"type": "string"}},
    "inputs": {"type": "array", "items": _TENSOR}, "outputs": {"type": "array", "items": _TENSOR}}}
INFER_RESPONSE = {"type": "object", "required": ["model_name", "outputs"], "properties": {
    "model_name": {"type": "string"}, "model_version": {"type": "string"},
    "id": {"type": "string"},
    "outputs": {"type": "array", "items": {**_TENSOR, "required": [
        "name", "shape", "datatype", "data"]}}}}
ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}

ROWS = [[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5], [5.9, 3.0, 4.2, 1.5]]
NUMERIC = ["UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
           "FP16", "FP32", "FP64"]


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """iris (string classes) and ``codes``: the same rows with integer classes."""
    root = tmp_path_factory.mktemp("v2")
    x, y = iris_data()
    store = ModelStore(root)
    store.register(DecisionTreeClassifier(random_state=0).fit(x, y), "iris",
                   features=IRIS_FEATURES, backend="sklearn")
    codes = np.unique(y, return_inverse=True)[1]
    store.register(DecisionTreeClassifier(random_state=0).fit(x, codes), "codes",
                   features=IRIS_FEATURES, backend="sklearn")
    return root


@pytest.fixture
async def client(two_models: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(create_app(Settings(model_root=two_models))) as c:
        yield c


def infer_body(rows: list[list[float]], datatype: str = "FP64") -> dict[str, Any]:
    flat = [v for r in rows for v in r]
    if not datatype.startswith("FP"):
        flat = [round(v) for v in flat]
    return {"id": "r1", "inputs": [{"name": "input", "shape": [len(rows), 4],
                                    "datatype": datatype, "data": flat}]}


async def test_server_metadata_at_the_specified_path(client: httpx.AsyncClient) -> None:
    for path in ("/v2/", "/v2"):
        r = await client.get(path)
        assert r.status_code == 200
        jsonschema.validate(r.json(), SERVER_METADATA)


async def test_model_metadata_and_response_objects(client: httpx.AsyncClient) -> None:
    meta = await client.get("/v2/models/iris")
    jsonschema.validate(meta.json(), MODEL_METADATA)
    r = await client.post("/v2/models/iris/versions/1/infer", json=infer_body(ROWS))
    assert r.status_code == 200
    jsonschema.validate(r.json(), INFER_RESPONSE)
    assert r.json()["id"] == "r1"


@pytest.mark.parametrize("datatype", NUMERIC)
async def test_every_numeric_datatype_is_accepted(client: httpx.AsyncClient,
                                                  datatype: str) -> None:
    body = infer_body(ROWS, datatype)
    r = await client.post("/v2/models/iris/infer", json=body)
    assert r.status_code == 200, r.text
    sent = np.array(body["inputs"][0]["data"], dtype=np.float64).reshape(3, 4).tolist()
    v1 = await client.post("/v1/models/iris/predict", json={"instances": sent})
    label = next(o for o in r.json()["outputs"] if o["name"] == "label")
    assert label["data"] == v1.json()["predictions"]


@pytest.mark.parametrize("datatype", ["BYTES", "BOOL"])
async def test_non_numeric_datatypes_get_a_clear_400(client: httpx.AsyncClient,
                                                     datatype: str) -> None:
    body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": datatype,
                        "data": ["a", "b", "c", "d"]}]}
    r = await client.post("/v2/models/iris/infer", json=body)
    assert r.status_code == 400
    jsonschema.validate(r.json(), ERROR)
    assert "not numeric" in r.json()["error"]


async def test_label_keeps_the_class_type_and_equals_v1(client: httpx.AsyncClient) -> None:
    for model, datatype in (("iris", "BYTES"), ("codes", "INT64")):
        meta = (await client.get(f"/v2/models/{model}")).json()
        assert meta["outputs"][0] == {"name": "label", "datatype": datatype, "shape": [-1]}
        r = await client.post(f"/v2/models/{model}/infer", json=infer_body(ROWS))
        label = next(o for o in r.json()["outputs"] if o["name"] == "label")
        assert label["datatype"] == datatype
        v1 = await client.post(f"/v1/models/{model}/predict", json={"instances": ROWS})
        assert label["data"] == v1.json()["predictions"]
    assert label["data"] == [0, 2, 1]


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v2/models/iris/config"), ("GET", "/v2/models/iris/stats"),
    ("POST", "/v2/nothing"), ("GET", "/v2/models/iris/infer"), ("DELETE", "/v2/models/iris"),
    ("GET", "/v2/models/nope"), ("POST", "/v2/models/nope/infer"),
    ("GET", "/v2/models/iris/versions/x/ready"),
])
async def test_every_v2_error_is_a_string(client: httpx.AsyncClient, method: str,
                                          path: str) -> None:
    r = await client.request(method, path, json=infer_body(ROWS))
    assert 400 <= r.status_code < 500
    jsonschema.validate(r.json(), ERROR)
