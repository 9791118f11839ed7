"""Fuzzing, bounded: no input may make the gateway answer 5xx.

* schemathesis over the app's own OpenAPI schema, against a real gateway process;
* hypothesis over the numeric and content headers of every front door;
* hypothesis over the V2 binary tensor framing (JSON header, its declared length, the bytes
  after it).

The header fuzz carries the values the attack found as explicit examples, so its outcome does
not depend on what hypothesis happens to draw.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from bench.procs import GatewayProcess, gateway_process
from tests.hardening.inproc import gateway_client

ROW = [6.3, 3.3, 6.0, 2.5]
QUERY = "/predict?sepal_length=6.3&sepal_width=3.3&petal_length=6.0&petal_width=2.5"
FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), database=None)
SCHEMA_EXAMPLES = 30  # per operation and generation mode


# -- schemathesis ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(compiled_store: Path) -> Iterator[GatewayProcess]:
    """The default deployment: the verified compiled backend. (With the scikit-learn backend,
    values beyond float32's range still answer 500: see
    ``test_core_regressions.test_values_beyond_float32_range_are_a_4xx``.)"""
    with gateway_process({"GATEWAY_MODEL_ROOT": str(compiled_store)}) as gw:
        yield gw


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_no_operation_of_the_schema_answers_5xx(served: GatewayProcess) -> None:
    """Every operation of ``/openapi.json``, with valid (positive) and invalid (negative)
    inputs generated from its schema."""
    api = schemathesis.openapi.from_url(f"{served.base}/openapi.json")
    cases, failures, operations = 0, [], 0
    for result in api.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(FUZZ, max_examples=SCHEMA_EXAMPLES)
            def check(case: Any) -> None:
                nonlocal cases
                cases += 1
                response = case.call(timeout=10)
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.formatted_path} {case.query} -> "
                                    f"{response.status_code}: {response.text[:200]}")

            try:
                check()
            except Unsatisfiable:  # no invalid input expressible for this operation
                continue
    print(f"schemathesis: {cases} cases over {operations} operations, {len(failures)} 5xx")
    assert operations >= 10 and cases > 0
    assert not failures, "\n".join(failures)


# -- hypothesis, in-process ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def portal() -> Iterator[BlockingPortal]:
    with start_blocking_portal(backend="asyncio") as p:
        yield p


@pytest.fixture(scope="module")
def client(portal: BlockingPortal, session_store: Path) -> Iterator[httpx.AsyncClient]:
    with portal.wrap_async_context_manager(gateway_client(session_store)) as c:
        yield c


def _call(portal: BlockingPortal, client: httpx.AsyncClient, method: str, path: str,
          headers: list[tuple[bytes, bytes]], content: bytes = b"") -> httpx.Response:
    async def go() -> httpx.Response:
        return await client.request(method, path, headers=headers, content=content)
    return portal.call(go)


# Header values as a client could send them: latin-1 bytes without CR, LF or NUL.
header_values = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=40)
    .map(lambda s: s.encode("latin-1")),
    st.integers(min_value=-(10**30), max_value=10**30).map(lambda i: str(i).encode()),
    st.integers(min_value=1, max_value=6000).map(lambda n: b"9" * n),
)
FRONT_DOORS = ["get", "v1", "v2-json", "v2-binary"]


def _request(door: str) -> tuple[str, str, bytes, int | None]:
    """(method, path, body, V2 binary header length) of a valid request through ``door``."""
    if door == "get":
        return "GET", QUERY, b"", None
    if door == "v1":
        return "POST", "/v1/models/iris/predict", orjson.dumps({"instances": [ROW]}), None
    header = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP64"}]}
    if door == "v2-json":
        header["inputs"][0]["data"] = ROW
        return "POST", "/v2/models/iris/infer", orjson.dumps(header), None
    raw = struct.pack("<4d", *ROW)
    header["inputs"][0]["parameters"] = {"binary_data_size": len(raw)}
    head = orjson.dumps(header)
    return "POST", "/v2/models/iris/infer", head + raw, len(head)


@given(door=st.sampled_from(FRONT_DOORS),
       name=st.sampled_from(["x-request-timeout-ms", "inference-header-content-length",
                             "content-length", "content-type"]),
       value=header_values)
@example(door="get", name="x-request-timeout-ms", value=b"\xb2")
@example(door="v1", name="x-request-timeout-ms", value=b"1" * 5000)
@example(door="v2-binary", name="inference-header-content-length", value=b"1" * 5000)
@example(door="v2-binary", name="inference-header-content-length", value=b"\xb2")
@example(door="v1", name="content-length", value=b"\xb2")
@settings(FUZZ, max_examples=300)
def test_no_header_value_answers_5xx(portal: BlockingPortal, client: httpx.AsyncClient,
                                     door: str, name: str, value: bytes) -> None:
    method, path, body, header_length = _request(door)
    headers = [(b"content-type", b"application/json")] if body else []
    if header_length is not None:
        headers.append((b"inference-header-content-length", str(header_length).encode()))
    headers = [(k, v) for k, v in headers if k != name.encode()] + [(name.encode(), value)]
    r = _call(portal, client, method, path, headers, body)
    deadline = name == "x-request-timeout-ms" and 0 < len(value) <= 6 and value.isdigit() \
        and int(value) > 0
    if deadline and r.status_code == 504:  # the client's own deadline, of a few ms, passed
        return
    assert r.status_code < 500, f"{door} {name}: {value[:40]!r} -> {r.status_code} {r.text}"


tensor = st.fixed_dictionaries(
    {"name": st.sampled_from(["input", "sepal_length", "petal_width", "x"]),
     "datatype": st.sampled_from(["FP64", "FP32", "INT32", "INT64", "BYTES", "BOOL", "FP16"]),
     "shape": st.lists(st.integers(min_value=-2, max_value=2**40), max_size=3)},
    optional={
        "parameters": st.fixed_dictionaries({}, optional={
            "binary_data_size": st.one_of(st.integers(min_value=-8, max_value=2**63),
                                          st.text(max_size=3), st.none()),
            "binary_data": st.booleans()}),
        "data": st.lists(st.one_of(st.floats(allow_nan=True), st.integers(), st.text(max_size=3),
                                   st.booleans(), st.none()), max_size=12),
    },
)
infer_header = st.fixed_dictionaries(
    {"inputs": st.lists(tensor, max_size=4)},
    optional={
        "id": st.text(max_size=5),
        "outputs": st.lists(st.fixed_dictionaries(
            {"name": st.sampled_from(["label", "probabilities", "prediction", "nope"])},
            optional={"parameters": st.fixed_dictionaries(
                {"binary_data": st.one_of(st.booleans(), st.integers())})}), max_size=3),
        "parameters": st.dictionaries(st.sampled_from(["binary_data_output", "timeout"]),
                                      st.one_of(st.booleans(), st.integers(), st.text(max_size=3))),
    },
)


@given(header=infer_header, tail=st.binary(max_size=160),
       declared=st.one_of(st.none(), st.just("exact"), st.integers(min_value=0, max_value=400)))
@settings(FUZZ, max_examples=400)
def test_no_v2_binary_framing_answers_5xx(portal: BlockingPortal, client: httpx.AsyncClient,
                                          header: dict[str, Any], tail: bytes,
                                          declared: int | str | None) -> None:
    head = json.dumps(header).encode()  # big integers and NaN included, as a client may send
    headers = [(b"content-type", b"application/octet-stream")]
    if declared is not None:
        length = len(head) if declared == "exact" else declared
        headers.append((b"inference-header-content-length", str(length).encode()))
    r = _call(portal, client, "POST", "/v2/models/iris/infer", headers, head + tail)
    assert r.status_code < 500, f"{head[:300]!r} + {len(tail)} bytes -> {r.status_code} {r.text}"
