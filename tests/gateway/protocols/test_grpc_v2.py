"""The Open Inference Protocol over gRPC, in-process: a grpc.aio server started by the app's
lifespan in the test's event loop, called by tritonclient's asyncio gRPC client and by raw
protobuf bytes; REST requests in the same loop share the one pipeline."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import orjson
import pytest
import tritonclient.grpc.aio as tc
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from gateway import Settings, create_app
from gateway.protocols.proto import grpc_service_pb2 as pb
from gateway.runtime import Gateway
from model_store import ModelStore
from tests.support import Probe, ProbeLoader, ProtocolTransport, wait_for, wait_thread_event

pytestmark = pytest.mark.anyio

INFER = "/inference.GRPCInferenceService/ModelInfer"
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


class Served:
    """An in-process gateway with gRPC on a free port."""

    def __init__(self, client: httpx.AsyncClient, probe: Probe, gw: Gateway, port: int) -> None:
        self.client, self.probe, self.gw, self.port = client, probe, gw, port
        self.address = f"127.0.0.1:{port}"
        self.channel = grpc.aio.insecure_channel(self.address)
        self.infer_raw = self.channel.unary_unary(INFER)

    async def call(self, method: str, body: bytes, **kwargs: Any) -> bytes:
        out: bytes = await self.channel.unary_unary(
            f"/inference.GRPCInferenceService/{method}")(body, **kwargs)
        return out

    async def status(self, body: bytes, **kwargs: Any) -> tuple[grpc.StatusCode, str]:
        try:
            await self.infer_raw(body, **kwargs)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        return grpc.StatusCode.OK, ""


@asynccontextmanager
async def served(root: Path, **overrides: Any) -> AsyncIterator[Served]:
    loader = ProbeLoader()
    app = create_app(Settings(model_root=root, grpc_port=0, **overrides),
                     store=ModelStore(root, loader=loader))
    async with app.router.lifespan_context(app) as state:
        assert state is not None
        transport = ProtocolTransport(app, dict(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            s = Served(client, loader.latest(), state["gateway"], state["grpc"].port)
            try:
                yield s
            finally:
                await s.channel.close()


def infer_request(rows: np.ndarray, *, datatype: str = "FP64", raw: bool = False,
                  outputs: tuple[str, ...] = (), **fields: Any) -> bytes:
    req = pb.ModelInferRequest(model_name=fields.pop("model", "iris"), **fields)
    t = req.inputs.add(name="input", datatype=datatype, shape=list(rows.shape))
    dtype = {"FP64": "<f8", "FP32": "<f4", "INT64": "<i8", "INT32": "<i4"}[datatype]
    values = rows.astype(dtype)
    if raw:
        req.raw_input_contents.append(values.tobytes())
    else:
        field = {"FP64": "fp64_contents", "FP32": "fp32_contents", "INT64": "int64_contents",
                 "INT32": "int_contents"}[datatype]
        getattr(t.contents, field).extend(values.ravel().tolist())
    for name in outputs:
        req.outputs.add(name=name)
    return req.SerializeToString()


def labels_of(response: pb.ModelInferResponse) -> list[str]:
    """The iris labels (class names: BYTES) of a response, typed or raw."""
    out = response.outputs[0]
    assert out.name == "label" and out.datatype == "BYTES"
    if not response.raw_output_contents:
        return [b.decode() for b in out.contents.bytes_contents]
    raw, labels = response.raw_output_contents[0], []
    while raw:
        n = int.from_bytes(raw[:4], "little")
        labels.append(raw[4:4 + n].decode())
        raw = raw[4 + n:]
    return labels


@pytest.mark.parametrize("raw", [False, True])
@pytest.mark.parametrize("datatype", ["FP64", "FP32"])
async def test_tritonclient_aio_answers_every_iris_row_as_the_estimator(
        session_store: Path, iris_estimator: Any, iris_rows: np.ndarray, raw: bool,
        datatype: str) -> None:
    async with served(session_store) as s:
        client = tc.InferenceServerClient(s.address)
        try:
            x = iris_rows.astype(np.float32 if datatype == "FP32" else np.float64)
            inp = tc.InferInput("input", list(x.shape), datatype)
            inp.set_data_from_numpy(x)
            if not raw:  # typed contents instead of tritonclient's raw bytes
                req = pb.ModelInferRequest(model_name="iris")
                t = req.inputs.add(name="input", datatype=datatype, shape=list(x.shape))
                getattr(t.contents, "fp32_contents" if datatype == "FP32"
                        else "fp64_contents").extend(x.ravel().tolist())
                got = pb.ModelInferResponse.FromString(await s.infer_raw(
                    req.SerializeToString()))
                labels = np.asarray(labels_of(got))
                probas = np.asarray(got.outputs[1].contents.fp64_contents).reshape(-1, 3)
            else:
                result = await client.infer("iris", [inp], outputs=[
                    tc.InferRequestedOutput("label"), tc.InferRequestedOutput("probabilities")])
                labels = result.as_numpy("label")
                probas = result.as_numpy("probabilities")
            want = x.astype(np.float64)
            if labels.dtype == object:  # tritonclient: BYTES as bytes
                labels = np.asarray([b.decode() for b in labels])
            np.testing.assert_array_equal(labels, iris_estimator.predict(want))  # type: ignore[attr-defined]
            np.testing.assert_allclose(probas, iris_estimator.predict_proba(want),  # type: ignore[attr-defined]
                                       rtol=1e-12)
        finally:
            await client.close()


async def test_metadata_readiness_and_health(session_store: Path) -> None:
    async with served(session_store) as s:
        client = tc.InferenceServerClient(s.address)
        try:
            assert await client.is_server_live()
            assert await client.is_server_ready()
            assert await client.is_model_ready("iris")
            assert await client.is_model_ready("iris", "1")
            meta = await client.get_model_metadata("iris", as_json=True)
            rest = (await s.client.get("/v2/models/iris")).json()
            assert meta["name"] == rest["name"] and meta["versions"] == rest["versions"]
            assert meta["platform"] == rest["platform"]
            for key in ("inputs", "outputs"):
                assert [{**t, "shape": [int(d) for d in t["shape"]]} for t in meta[key]] \
                    == rest[key]
            server = await client.get_server_metadata(as_json=True)
            assert server["name"] == "inference-gateway"
            with pytest.raises(InferenceServerException) as info:
                await client.get_model_metadata("nope")
            assert info.value.status() == "StatusCode.NOT_FOUND"
            with pytest.raises(InferenceServerException) as info:
                await client.is_model_ready("iris", "7")
            assert info.value.status() == "StatusCode.NOT_FOUND"
        finally:
            await client.close()
        check = s.channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString)
        assert (await check(health_pb2.HealthCheckRequest())).status \
            == health_pb2.HealthCheckResponse.SERVING
        s.gw.accepting = False  # as the drain does
        assert (await check(health_pb2.HealthCheckRequest(
            service="inference.GRPCInferenceService"))).status \
            == health_pb2.HealthCheckResponse.NOT_SERVING
        code, details = await s.status(infer_request(np.array([[5.1, 3.5, 1.4, 0.2]])))
        assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details
        s.gw.accepting = True


async def test_reflection_lists_the_services(session_store: Path) -> None:
    from grpc_reflection.v1alpha import reflection_pb2

    async with served(session_store) as s:
        stream = s.channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        call = stream(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {svc.name async for r in call for svc in r.list_services_response.service}
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


async def test_repository_needs_the_admin_token(session_store: Path) -> None:
    async with served(session_store) as s:
        client = tc.InferenceServerClient(s.address)
        try:
            with pytest.raises(InferenceServerException) as info:
                await client.get_model_repository_index()
            assert info.value.status() == "StatusCode.PERMISSION_DENIED"
        finally:
            await client.close()


async def test_repository_index_load_unload(store_root: Path) -> None:
    async with served(store_root, admin_token="s3cret") as s:
        client = tc.InferenceServerClient(s.address)
        auth = {"authorization": "Bearer s3cret"}
        try:
            for headers in ({}, {"authorization": "Bearer wrong"}):
                with pytest.raises(InferenceServerException) as info:
                    await client.unload_model("iris", headers=headers)
                assert info.value.status() == "StatusCode.UNAUTHENTICATED"
            index = await client.get_model_repository_index(headers=auth, as_json=True)
            assert index["models"] == [{"name": "iris", "version": "1", "state": "READY"}]
            await client.unload_model("iris", headers=auth)
            assert not await client.is_server_ready()
            with pytest.raises(InferenceServerException) as info:
                await client.is_model_ready("iris")
            assert info.value.status() == "StatusCode.NOT_FOUND"
            index = await client.get_model_repository_index(headers=auth, as_json=True)
            assert index["models"][0]["state"] == "UNLOADED"
            await client.load_model("iris", headers=auth)
            assert await client.is_model_ready("iris")
            with pytest.raises(InferenceServerException) as info:
                await client.load_model("nope", headers=auth)
            assert info.value.status() == "StatusCode.NOT_FOUND"
        finally:
            await client.close()


# The same bad tensors, as REST JSON and as gRPC typed contents: the same message.
_BAD = [
    ({"name": "input", "shape": [1, 3], "datatype": "FP64", "data": [1.0, 2.0, 3.0]}, None),
    ({"name": "input", "shape": [1, 4], "datatype": "FP64", "data": [1.0, 2.0, 3.0]}, None),
    ({"name": "input", "shape": [1, 4], "datatype": "BYTES", "data": []}, None),
    ({"name": "input", "shape": [1, 4], "datatype": "FP128", "data": []}, None),
    ({"name": "input", "shape": [1, 4], "datatype": "INT8", "data": [1, 2, 3, 300]}, None),
    ({"name": "input", "shape": [1, -4], "datatype": "FP64", "data": []}, None),
    ({"name": "input", "shape": [1, 2, 2], "datatype": "FP64", "data": [1.0] * 4}, None),
    ({"name": "input", "shape": [1, 4], "datatype": "FP64", "data": [1.0, 2.0, 3.0, 0.0]},
     "nan"),
]


@pytest.mark.parametrize(("tensor", "poison"), _BAD)
async def test_bad_input_is_invalid_argument_with_the_rest_message(
        session_store: Path, tensor: dict[str, Any], poison: str | None) -> None:
    field = {"FP64": "fp64_contents", "INT8": "int_contents"}.get(tensor["datatype"])
    req = pb.ModelInferRequest(model_name="iris")
    t = req.inputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
    data = list(tensor["data"])
    if poison:
        data[-1] = float(poison)
    if field:
        getattr(t.contents, field).extend(data)
    async with served(session_store) as s:
        if poison:  # JSON cannot carry NaN: REST gets it as binary tensor data
            head = orjson.dumps({"inputs": [{**tensor, "data": None, "parameters": {
                "binary_data_size": 32}}]}).replace(b'"data":null,', b"")
            body = head + struct.pack("<4d", *data)
            r = await s.client.post("/v2/models/iris/infer", content=body, headers={
                "inference-header-content-length": str(len(head))})
        else:
            r = await s.client.post("/v2/models/iris/infer", json={"inputs": [tensor]})
        assert r.status_code == 400
        code, details = await s.status(req.SerializeToString())
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details == r.json()["error"]
        assert s.probe.calls == 0


async def test_status_codes(session_store: Path) -> None:
    row = np.array([[5.1, 3.5, 1.4, 0.2]])
    async with served(session_store, max_rows=8, max_body_bytes=4096) as s:
        assert (await s.status(infer_request(row, model="nope")))[0] == grpc.StatusCode.NOT_FOUND
        assert (await s.status(infer_request(row, model_version="9")))[0] \
            == grpc.StatusCode.NOT_FOUND
        assert (await s.status(infer_request(row, model_version="x")))[0] \
            == grpc.StatusCode.INVALID_ARGUMENT
        code, details = await s.status(infer_request(np.ones((9, 4))))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "8" in details
        assert (await s.status(infer_request(np.ones((100, 4)), raw=True)))[0] \
            == grpc.StatusCode.RESOURCE_EXHAUSTED  # too many rows, as raw contents
        big = infer_request(np.ones((8, 4)), id="x" * 5000)  # over GATEWAY_MAX_BODY_BYTES
        assert (await s.status(big))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (await s.status(b"\xff\xff\xff"))[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert (await s.status(infer_request(row, outputs=("nope",))))[0] \
            == grpc.StatusCode.INVALID_ARGUMENT
        # A deadline already too short for a held model call.
        s.probe.gate.clear()
        try:
            code, _ = await s.status(infer_request(np.array([[6.0, 3.0, 4.0, 1.0]])),
                                     timeout=0.2)
        finally:
            s.probe.gate.set()
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        metrics = (await s.client.get("/metrics")).text
        assert 'gateway_grpc_requests_total{code="NOT_FOUND",method="ModelInfer"} 2.0' in metrics
        assert 'code="INTERNAL"' not in metrics and 'code="UNKNOWN"' not in metrics


async def test_request_id_and_access_log(session_store: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="gateway.access")
    async with served(session_store, access_log="on") as s:
        call = s.infer_raw(infer_request(np.array([[5.1, 3.5, 1.4, 0.2]]), raw=True),
                           metadata=(("x-request-id", "abc-123"),))
        response = await call
        assert labels_of(pb.ModelInferResponse.FromString(response)) == ["setosa"]
        assert ("x-request-id", "abc-123") in tuple(await call.trailing_metadata())
    lines = [r for r in caplog.records if r.name == "gateway.access"]
    assert any("ModelInfer" in r.getMessage() and getattr(r, "request_id", None) in
               (None, "abc-123") for r in lines)


async def test_identical_burst_split_between_rest_and_grpc_is_one_model_call(
        session_store: Path) -> None:
    row = [6.1, 2.8, 4.7, 1.2]
    body = infer_request(np.array([row]), raw=True)
    async with served(session_store) as s:
        s.probe.gate.clear()
        async def one() -> bytes:
            out: bytes = await s.infer_raw(body)
            return out

        grpc_calls = [asyncio.create_task(one()) for _ in range(50)]
        rest_calls = [asyncio.create_task(s.client.post("/v2/models/iris/infer", json={
            "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP64", "data": row}],
            "outputs": [{"name": "label"}]})) for _ in range(50)]
        await wait_thread_event(s.probe.entered)
        await wait_for(lambda: s.gw.pipeline.waiting() == 100)
        s.probe.gate.set()
        answers = await asyncio.gather(*grpc_calls)
        rests = await asyncio.gather(*rest_calls)
        assert s.probe.calls == 1
        assert {labels_of(pb.ModelInferResponse.FromString(a))[0] for a in answers} \
            == {"versicolor"}
        assert {r.json()["outputs"][0]["data"][0] for r in rests} == {"versicolor"}


# -- fuzz ------------------------------------------------------------------------------------
_DATATYPES = ["FP64", "FP32", "FP16", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16",
              "UINT32", "UINT64", "BOOL", "BYTES", "", "fp64", "STRING"]
_FIELDS = ["fp64_contents", "fp32_contents", "int_contents", "int64_contents",
           "uint_contents", "uint64_contents", "bool_contents", "bytes_contents"]
_VALUES = {
    "fp64_contents": st.floats(), "fp32_contents": st.floats(width=32),
    "int_contents": st.integers(-(2 ** 31), 2 ** 31 - 1),
    "int64_contents": st.integers(-(2 ** 63), 2 ** 63 - 1),
    "uint_contents": st.integers(0, 2 ** 32 - 1), "uint64_contents": st.integers(0, 2 ** 64 - 1),
    "bool_contents": st.booleans(), "bytes_contents": st.binary(max_size=8),
}


@st.composite
def infer_messages(draw: st.DrawFn) -> bytes:
    """Plausible-to-hostile ModelInferRequests: names, shapes, datatypes, contents and raw
    bytes drawn independently, and now and then the bytes themselves cut or flipped."""
    req = pb.ModelInferRequest(
        model_name=draw(st.sampled_from(["iris", "iris", "iris", "", "nope"])),
        model_version=draw(st.sampled_from(["", "", "1", "2", "latest", "-1", "x" * 20])),
        id=draw(st.sampled_from(["", "r1"])))
    raw = draw(st.booleans())
    features = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    for _ in range(draw(st.integers(0, 5))):
        t = req.inputs.add(name=draw(st.sampled_from(["input", "x", *features])),
                           datatype=draw(st.sampled_from(_DATATYPES)),
                           shape=draw(st.lists(st.sampled_from(
                               [-1, 0, 1, 2, 3, 4, 5, 2 ** 31, 2 ** 62]), max_size=3)))
        if raw:
            req.raw_input_contents.append(draw(st.binary(max_size=80)))
        for field in draw(st.lists(st.sampled_from(_FIELDS), max_size=2)):
            getattr(t.contents, field).extend(draw(st.lists(_VALUES[field], max_size=12)))
    if draw(st.booleans()):
        req.raw_input_contents.append(draw(st.binary(max_size=16)))
    for name in draw(st.lists(st.sampled_from(["label", "probabilities", "x"]), max_size=3)):
        req.outputs.add(name=name)
    key = draw(st.sampled_from(["", "timeout", "binary_data_output", "priority"]))
    if key:
        p = req.parameters[key]
        choice = draw(st.sampled_from(["bool_param", "int64_param", "string_param",
                                       "double_param"]))
        setattr(p, choice, {"bool_param": True, "int64_param": draw(st.integers(-5, 10 ** 7)),
                            "string_param": "s", "double_param": 1.5}[choice])
    data = req.SerializeToString()
    mangle = draw(st.sampled_from(["none", "none", "none", "cut", "flip", "junk"]))
    if mangle == "cut" and data:
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif mangle == "flip" and data:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
    elif mangle == "junk":
        data = draw(st.binary(max_size=64))
    return data


async def fuzz(s: Served, messages: list[bytes]) -> dict[grpc.StatusCode, int]:
    """Every message answered (concurrently, 32 at a time) with a status a client can act on."""
    seen: dict[grpc.StatusCode, int] = {}
    for i in range(0, len(messages), 32):
        codes = await asyncio.gather(*(s.status(m, timeout=30) for m in messages[i:i + 32]))
        for code, details in codes:
            assert code not in NEVER, details
            seen[code] = seen.get(code, 0) + 1
    return seen


async def test_fuzzed_model_infer_never_unknown_or_internal(session_store: Path) -> None:
    messages: list[bytes] = []

    @settings(max_examples=400, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(infer_messages())
    def collect(m: bytes) -> None:
        messages.append(m)

    collect()
    async with served(session_store, max_rows=16) as s:
        seen = await fuzz(s, messages)
    assert seen.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 0
