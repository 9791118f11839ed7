"""The Open Inference Protocol over gRPC against a real gateway process (``python -m gateway``
with ``GATEWAY_GRPC_PORT``), called by the stock ``tritonclient.grpc`` client and its own
generated stub; a fuzz of 10,000 ``ModelInfer`` messages with malformed and oversized protobuf:
never ``UNKNOWN``/``INTERNAL``, the process alive, its RSS flat."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from hypothesis import HealthCheck, given, settings
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from bench.procs import GatewayProcess, free_port, gateway_process
from tests.gateway.protocols.test_grpc_v2 import NEVER, infer_messages

pytestmark = pytest.mark.e2e

INFER = "/inference.GRPCInferenceService/ModelInfer"
MAX_BODY = 65_536


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory,
           iris_estimator: Any) -> Iterator[tuple[GatewayProcess, str]]:
    from model_store import ModelStore
    from model_store.demo import IRIS_FEATURES

    root = tmp_path_factory.mktemp("models")
    ModelStore(root).register(iris_estimator, "iris", features=IRIS_FEATURES, backend="sklearn")
    port = free_port()
    env = {"GATEWAY_MODEL_ROOT": str(root), "GATEWAY_GRPC_PORT": str(port),
           "GATEWAY_ADMIN_TOKEN": "s3cret", "GATEWAY_MAX_BODY_BYTES": str(MAX_BODY),
           "GATEWAY_MODEL_POLL_S": "0"}
    with gateway_process(env) as gw:
        gw.process.wait_for(rf"gRPC \(Open Inference Protocol\) on 127\.0\.0\.1:{port}")
        yield gw, f"127.0.0.1:{port}"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_stock_tritonclient_answers_all_150_rows_raw_and_typed(
        served: tuple[GatewayProcess, str], iris_estimator: Any, iris_rows: np.ndarray) -> None:
    _, address = served
    want_labels = iris_estimator.predict(iris_rows)  # type: ignore[attr-defined]
    want_probas = iris_estimator.predict_proba(iris_rows)  # type: ignore[attr-defined]
    client = tc.InferenceServerClient(address)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))
    failures = 0
    try:
        # Raw contents, as tritonclient sends them: every row alone, then all in one call.
        for i, row in enumerate(iris_rows):
            inp = tc.InferInput("input", [1, 4], "FP64")
            inp.set_data_from_numpy(row.reshape(1, 4))
            result = client.infer("iris", [inp])
            failures += result.as_numpy("label")[0].decode() != want_labels[i]
            failures += not np.allclose(result.as_numpy("probabilities")[0], want_probas[i],
                                        rtol=1e-12, atol=0)
        inp = tc.InferInput("input", [150, 4], "FP32")
        inp.set_data_from_numpy(iris_rows.astype(np.float32))
        result = client.infer("iris", [inp], outputs=[tc.InferRequestedOutput("label")])
        assert [b.decode() for b in result.as_numpy("label")] == list(want_labels)
        # Typed contents, through tritonclient's own generated stub and messages.
        for i, row in enumerate(iris_rows):
            req = service_pb2.ModelInferRequest(model_name="iris", id=f"r{i}")
            t = req.inputs.add(name="input", datatype="FP64", shape=[1, 4])
            t.contents.fp64_contents.extend(row.tolist())
            got = stub.ModelInfer(req)
            assert got.id == f"r{i}" and got.model_version == "1"
            failures += got.outputs[0].contents.bytes_contents[0].decode() != want_labels[i]
            failures += not np.allclose(list(got.outputs[1].contents.fp64_contents),
                                        want_probas[i], rtol=1e-12, atol=0)
    finally:
        client.close()
    assert failures == 0


def test_metadata_readiness_and_repository(served: tuple[GatewayProcess, str]) -> None:
    _, address = served
    client = tc.InferenceServerClient(address)
    auth = {"authorization": "Bearer s3cret"}
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("iris") and client.is_model_ready("iris", "1")
        meta = client.get_model_metadata("iris", as_json=True)
        assert meta["versions"] == ["1"] and meta["inputs"][0]["shape"] == ["-1", "4"]
        assert [o["name"] for o in meta["outputs"]] == ["label", "probabilities"]
        assert client.get_server_metadata(as_json=True)["name"] == "inference-gateway"
        with pytest.raises(InferenceServerException) as info:
            client.get_model_repository_index()
        assert info.value.status() == "StatusCode.UNAUTHENTICATED"
        index = client.get_model_repository_index(headers=auth, as_json=True)
        assert index["models"] == [{"name": "iris", "version": "1", "state": "READY"}]
        client.unload_model("iris", headers=auth)
        assert not client.is_server_ready()
        client.load_model("iris", headers=auth)
        assert client.is_model_ready("iris")
    finally:
        client.close()


@pytest.mark.slow
def test_fuzzed_malformed_and_oversized_messages(served: tuple[GatewayProcess, str]) -> None:
    """``GRPC_FUZZ_EXAMPLES`` (2,000 in the suite; 10,000 for the issue's measurement)
    generated messages (plausible to hostile, some cut, flipped or junk), then oversized ones:
    each answered with a status a client can act on; RSS printed at a fifth, the whole run
    and the end."""
    examples = int(os.environ.get("GRPC_FUZZ_EXAMPLES", "2000"))
    gw, address = served
    channel = grpc.insecure_channel(address)
    infer = channel.unary_unary(INFER)
    seen: dict[grpc.StatusCode, int] = {}
    rss: list[int] = []

    def status(message: bytes) -> grpc.StatusCode:
        try:
            infer(message, timeout=30)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            assert code not in NEVER, exc.details()
            return code
        return grpc.StatusCode.OK

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(infer_messages())
    def check(message: bytes) -> None:
        code = status(message)
        seen[code] = seen.get(code, 0) + 1
        if sum(seen.values()) in (examples // 5, examples):
            rss.append(rss_kib(gw.process.pid))

    check()
    assert sum(seen.values()) >= examples, seen
    for size in (MAX_BODY + 1, 4 * MAX_BODY):
        req = service_pb2.ModelInferRequest(model_name="iris")
        req.raw_input_contents.append(b"\0" * size)
        assert status(req.SerializeToString()) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status(b"\x0a\xff\xff\xff\xff\x0f") == grpc.StatusCode.INVALID_ARGUMENT
    rss.append(rss_kib(gw.process.pid))
    print(f"fuzz statuses: { {c.name: n for c, n in seen.items()} }; RSS KiB at "
          f"{examples // 5}, {examples}, end: {rss}")
    assert rss[-1] - rss[0] < 8 * 1024, rss  # flat: under 8 MiB over the last 8,000 calls
    channel.close()
    assert gw.proc.poll() is None
