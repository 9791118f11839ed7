"""Decoding of Open Inference Protocol requests, with hostile binary bodies."""

from __future__ import annotations

import json
import struct
from unittest.mock import patch

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import GatewayError, InvalidInput, MalformedJson
from gateway.protocols.v2_codec import (
    OutputSpec,
    _fast_request,
    decode_infer_request,
    encode_infer_response,
)
from model_store.demo import IRIS_FEATURES

ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]])


def binary_request(rows: np.ndarray, dtype: str = "FP64", np_dtype: str = "<f8",
                   size: int | None = None, extra: dict | None = None,
                   tail: bytes = b"") -> tuple[bytes, str]:
    data = rows.astype(np_dtype).tobytes()
    header = orjson.dumps({
        "inputs": [{"name": "input", "shape": list(rows.shape), "datatype": dtype,
                    "parameters": {"binary_data_size": len(data) if size is None else size}}],
        **(extra or {}),
    })
    return header + data + tail, str(len(header))


def decode(body: bytes, header_len: str | None = None):
    return decode_infer_request(body, header_len, IRIS_FEATURES, max_rows=1024)


@pytest.mark.parametrize(("dtype", "np_dtype"), [("FP64", "<f8"), ("FP32", "<f4"),
                                                 ("INT32", "<i4"), ("INT64", "<i8")])
def test_binary_tensor_of_each_datatype(dtype: str, np_dtype: str) -> None:
    rows = ROWS if dtype.startswith("FP") else np.array([[5, 3, 1, 0], [6, 3, 6, 2]])
    req = decode(*binary_request(rows, dtype, np_dtype))
    assert np.array_equal(req.rows, rows.astype(np_dtype).astype(np.float64))
    assert req.outputs is None and req.binary_default is False


def test_json_data_flat_or_nested_and_per_feature_tensors() -> None:
    nested = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP64",
                          "data": ROWS.tolist()}], "id": "r1",
              "outputs": [{"name": "label", "parameters": {"binary_data": True}}]}
    req = decode(orjson.dumps(nested))
    assert np.array_equal(req.rows, ROWS) and req.request_id == "r1"
    assert req.outputs == (OutputSpec("label", True),)
    flat = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32",
                        "data": ROWS.ravel().tolist()}]}
    assert np.array_equal(decode(orjson.dumps(flat)).rows, ROWS.astype("<f4").astype("<f8"))
    per_feature = {"inputs": [
        {"name": f, "shape": [2, 1], "datatype": "FP64", "data": ROWS[:, i].tolist()}
        for i, f in reversed(list(enumerate(IRIS_FEATURES)))]}
    assert np.array_equal(decode(orjson.dumps(per_feature)).rows, ROWS)


HOSTILE = [
    ("size larger than body", lambda: binary_request(ROWS, size=10**12)),
    ("size smaller than shape", lambda: binary_request(ROWS, size=8)),
    ("negative size", lambda: binary_request(ROWS, size=-64)),
    ("truncated data", lambda: (lambda b, h: (b[:-5], h))(*binary_request(ROWS))),
    ("trailing bytes", lambda: binary_request(ROWS, tail=b"xx")),
    ("header length past body", lambda: (binary_request(ROWS)[0], "999999")),
    ("header length negative", lambda: (binary_request(ROWS)[0], "-4")),
    ("header length zero", lambda: (binary_request(ROWS)[0], "0")),
    ("huge shape", lambda: (orjson.dumps({"inputs": [{"name": "input", "shape": [2**40, 4],
     "datatype": "FP64", "parameters": {"binary_data_size": 2**45}}]}), None)),
    ("huge inner dimension", lambda: (orjson.dumps({"inputs": [{"name": "input",
     "shape": [1, 2**40], "datatype": "FP64", "data": []}]}), None)),
    ("negative dimension", lambda: (orjson.dumps({"inputs": [{"name": "input",
     "shape": [-1, 4], "datatype": "FP64", "data": []}]}), None)),
    ("wrong feature count", lambda: binary_request(ROWS[:, :3])),
    ("bad datatype", lambda: binary_request(ROWS, dtype="FP16")),
    ("nan", lambda: binary_request(np.array([[np.nan, 1, 2, 3]]))),
    ("inf fp32", lambda: binary_request(np.array([[np.inf, 1, 2, 3]]), "FP32", "<f4")),
    ("no inputs", lambda: (b'{"inputs": []}', None)),
    ("data count mismatch", lambda: (orjson.dumps({"inputs": [{"name": "i", "shape": [2, 4],
     "datatype": "FP64", "data": [1, 2, 3]}]}), None)),
    ("string data", lambda: (orjson.dumps({"inputs": [{"name": "i", "shape": [1, 4],
     "datatype": "FP64", "data": [1, "2", 3, 4]}]}), None)),
    ("bool data", lambda: (orjson.dumps({"inputs": [{"name": "i", "shape": [1, 4],
     "datatype": "FP64", "data": [1, True, 3, 4]}]}), None)),
    ("missing feature", lambda: (orjson.dumps({"inputs": [{"name": f, "shape": [1, 1],
     "datatype": "FP64", "data": [1.0]} for f in IRIS_FEATURES[:3]]}), None)),
    ("too many rows", lambda: binary_request(np.ones((1025, 4)))),
    ("bad binary_data flag", lambda: binary_request(ROWS, extra={"outputs": [
        {"name": "label", "parameters": {"binary_data": "yes"}}]})),
]


@pytest.mark.parametrize(("case", "make"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_requests_are_refused(case: str, make) -> None:
    body, header_len = make()
    with pytest.raises(InvalidInput):
        decode(body, header_len)


def test_malformed_header_json() -> None:
    with pytest.raises(MalformedJson):
        decode(b'{"inputs": [', None)


def test_encode_binary_and_json_outputs() -> None:
    probs = np.array([[1.0, 0.0, 0.0], [0.0, 0.25, 0.75]])
    body, header_len = encode_infer_response(
        model_name="iris", model_version="1", request_id="abc",
        outputs=[(OutputSpec("label", True), "BYTES", [2], [b'"setosa"', b'"virginica"']),
                 (OutputSpec("probabilities", False), "FP64", [2, 3],
                  [orjson.dumps(p) for p in probs.tolist()])])
    assert header_len is not None
    header = orjson.loads(body[:header_len])
    assert header["id"] == "abc" and header["model_version"] == "1"
    label, proba = header["outputs"]
    assert label["parameters"]["binary_data_size"] == len(body) - header_len
    blob = body[header_len:]
    (n,) = struct.unpack("<I", blob[:4])
    assert blob[4:4 + n] == b"setosa"
    assert proba["data"] == probs.ravel().tolist() and proba["shape"] == [2, 3]
    body, header_len = encode_infer_response(
        model_name="iris", model_version="1", request_id=None,
        outputs=[(OutputSpec("label", False), "BYTES", [1], [b'"setosa"'])])
    assert header_len is None and orjson.loads(body)["outputs"][0]["data"] == ["setosa"]


def test_encode_numeric_labels_and_binary_probabilities() -> None:
    body, header_len = encode_infer_response(
        model_name="wine", model_version="2", request_id=None,
        outputs=[(OutputSpec("label", False), "INT64", [2], [b"0", b"2"]),
                 (OutputSpec("probabilities", True), "FP64", [2, 2], [b"[0.5,0.5]", b"[0,1]"])])
    assert header_len is not None
    label, proba = orjson.loads(body[:header_len])["outputs"]
    assert label["data"] == [0, 2] and label["datatype"] == "INT64"
    assert proba["parameters"]["binary_data_size"] == 32
    assert np.frombuffer(body[header_len:], "<f8").tolist() == [0.5, 0.5, 0.0, 1.0]


def _one(tensor: dict, **extra) -> bytes:
    return orjson.dumps({"inputs": [{"name": "i", "shape": [1, 4], "datatype": "FP64",
                                     **tensor}], **extra})


def _per_feature(*tensors: tuple[str, list[int], list[float]]) -> bytes:
    return orjson.dumps({"inputs": [{"name": n, "shape": s, "datatype": "FP64", "data": d}
                                    for n, s, d in tensors]})


_ROW = {"data": [5.1, 3.5, 1.4, 0.2]}
_FEATURES = ", ".join(IRIS_FEATURES)
_TYPES = "UINT8, UINT16, UINT32, UINT64, INT8, INT16, INT32, INT64, FP16, FP32, FP64"
_COLUMNS = [(f, [1], [1.0]) for f in IRIS_FEATURES]
_EMPTY_BINARY = _one({"shape": [0, 4], "parameters": {"binary_data_size": 0}})
# (body, Inference-Header-Content-Length, the message), in the order the decoder checks.
MESSAGES = [
    (b"{}", "5", "Inference-Header-Content-Length '5' does not fit a body of 2 bytes"),
    (b"{}", "0" * 18 + "2",
     "Inference-Header-Content-Length '0000000000000000002' does not fit a body of 2 bytes"),
    (b"[]", None, "inference request must be a JSON object"),
    (b'{"inputs": []}', None, "'inputs' must be a non-empty list"),
    (b'{"inputs": [{"shape": [1, 4]}]}', None, "each input must be an object with a 'name'"),
    (_one({"shape": [1.0, 4]}), None, "input 'i': 'shape' must be a list of integers"),
    (_one({"shape": [-1, 4]}), None, "input 'i': negative dimension in shape [-1, 4]"),
    (_one({"datatype": "BYTES"}), None,
     f"input 'i': datatype BYTES is not numeric; this model takes numbers ({_TYPES})"),
    (_one({"datatype": []}), None, f"input 'i': datatype must be a string (one of {_TYPES})"),
    (_one({"datatype": {"a": 1}}), None,
     f"input 'i': datatype must be a string (one of {_TYPES})"),
    (_one({"datatype": "FP128"}), None,
     f"input 'i': datatype 'FP128' not supported (use one of {_TYPES})"),
    (_one({"shape": [1, 2, 2]}), None,
     "input 'i': shape [1, 2, 2] must be [n, 4] or [n, 1] with n <= 1024"),
    (_one({"shape": [1, 5000]}), None, "input 'i': shape [1, 5000] holds more than 1024 rows"),
    (_one({"parameters": 5, **_ROW}), None, "input 'i': 'parameters' must be an object"),
    (_one({"parameters": {"binary_data_size": True}}), None,
     "input 'i': binary_data_size must be a non-negative integer"),
    (_one({"parameters": {"binary_data_size": 8}}), None,
     "input 'i': binary_data_size 8 does not match shape [1, 4] of FP64 (32 bytes)"),
    (_one({"parameters": {"binary_data_size": 32}}), None,
     "input 'i': body ends 32 bytes short of its binary data"),
    (_one({"parameters": {"binary_data_size": 0}, "shape": [0, 4], **_ROW}), None,
     "input 'i': both 'data' and binary_data_size given"),
    (_one({}), None, "input 'i': no 'data' and no binary_data_size"),
    (_one({"data": 5}), None, "input 'i': 'data' must be a list"),
    (_one({"data": [[[[[[5.1, 3.5, 1.4, 0.2]]]]]]}), None,
     "input 'i': 'data' is nested too deeply"),
    (_one({"data": [1, 2, 3]}), None, "input 'i': shape holds 4 values, 'data' has 3"),
    (_one({"data": [1, "2", None, 4]}), None, "input 'i': FP64 'data' holds '2', not a number"),
    (_one({"datatype": "INT32", "data": [1, 2, 3.0, True]}), None,
     "input 'i': INT32 'data' holds 3.0, not an integer"),
    (_one({"datatype": "INT8", "data": [1, 2, 300, 4]}), None,
     "input 'i': a value is out of INT8 range"),
    (_EMPTY_BINARY + b"xx", str(len(_EMPTY_BINARY)),
     "2 bytes after the last input's binary data"),
    (_one({"shape": [1, 3], "data": [1, 2, 3]}), None,
     f"input 'i': shape [1, 3] must be [n, 4] ({_FEATURES})"),
    (_per_feature(*_COLUMNS, ("x", [1], [1.0])), None,
     f"input 'x' is not a feature of this model ({_FEATURES})"),
    (_per_feature(*_COLUMNS, _COLUMNS[0]), None, "input 'sepal_length' given twice"),
    (_per_feature(*_COLUMNS[:3], ("petal_width", [1, 2], [1.0, 2.0])), None,
     "input 'petal_width': shape [1, 2] must be [n] or [n, 1]"),
    (_per_feature(*_COLUMNS[:3]), None, "missing feature input(s): petal_width"),
    (_per_feature(*_COLUMNS[:3], ("petal_width", [2], [1.0, 2.0])), None,
     "feature inputs differ in length: [1, 2]"),
    (_one({"shape": [0, 4], "data": []}), None, "at least one row is required"),
    (_one({"datatype": "FP32", "data": [1, 1e39, 3, 4]}), None,
     "row 0, feature 'sepal_width': inf is not a finite number"),
    (_one(_ROW, parameters=[1]), None, "'parameters' must be an object"),
    (_one(_ROW, outputs={}), None, "'outputs' must be a list"),
    (_one(_ROW, outputs=[{"name": 1}]), None,
     "each requested output must be an object with a 'name'"),
    (_one(_ROW, outputs=[{"name": "label", "parameters": {"binary_data": 1}}]), None,
     "output 'label': binary_data must be true or false"),
    (_one(_ROW, id=5), None, "'id' must be a string"),
    (_one(_ROW, parameters={"timeout": 1.5}), None,
     "parameters.timeout must be a positive integer (microseconds)"),
    # several faults: the first step's, then the first check's within it
    (_one({"datatype": "FP32", "data": [1, 1e39, 3, 4]}, outputs=5, id=5), None,
     "row 0, feature 'sepal_width': inf is not a finite number"),
    (_one(_ROW, outputs=5, id=5, parameters={"timeout": 0}), None, "'outputs' must be a list"),
]


@pytest.mark.parametrize(("body", "header_len", "message"), MESSAGES,
                         ids=[m[2][:50] for m in MESSAGES])
def test_each_refusal_names_its_fault(body: bytes, header_len: str | None,
                                      message: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        decode(body, header_len)
    assert (refused.value.message, refused.value.code) == (message, "bad_request")


def test_data_nested_four_deep_is_read_row_major() -> None:
    req = decode(_one({"shape": [2, 4], "data": [[[[[1, 2], [3, 4]]]], [[5, [6, [7, 8]]]]]}))
    assert req.rows.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]


# -- the usual JSON request read at C speed ---------------------------------------------------

def _outcome(body: bytes) -> tuple[str, object]:
    try:
        req = decode(body)
    except GatewayError as exc:
        return type(exc).__name__, (exc.code, exc.message)
    return "ok", (req.rows.shape, req.rows.tobytes(), req.outputs, req.binary_default,
                  req.request_id, req.timeout_us)


json_numbers = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.sampled_from([0.0, -0.0, 1e-400, 3.5e38, 70000.0, 5e-324]),
)


@st.composite
def v2_bodies(draw: st.DrawFn) -> bytes:
    """V2 JSON requests as clients write them, some subtly wrong (shape, datatype, values of
    other types, extra or duplicate fields, byte-level damage)."""
    n = draw(st.sampled_from([1, 2, 3, 0]))
    width = draw(st.sampled_from([4, 4, 4, 3]))
    data: list[object] = draw(st.lists(json_numbers, min_size=n * width, max_size=n * width))
    sometimes = st.sampled_from([False, False, False, True])  # mostly the usual request
    if data and draw(sometimes):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.sampled_from(
            [True, None, "1", [1.0], {"a": 1}, 1e39]))
    tensor: dict[str, object] = {
        "name": draw(st.sampled_from(["input", "input", "in[0]"])),
        "shape": draw(st.sampled_from([[n, width], [n, width], [n * width], [n, 4.0]])),
        "datatype": draw(st.sampled_from(["FP64", "FP32", "FP16", "FP64", "INT32", "BOOL",
                                          "fp64"])),
        "data": data,
    }
    if draw(sometimes):
        tensor[draw(st.sampled_from(["parameters", "extra"]))] = {}
    request: dict[str, object] = {"inputs": [tensor]}
    if draw(st.booleans()):
        request["id"] = draw(st.one_of(st.text(max_size=3), st.integers(-2, 2), st.none()))
    if draw(sometimes):
        request[draw(st.sampled_from(["outputs", "parameters", "other"]))] = \
            draw(st.sampled_from([[], {}, [{"name": "label"}], {"binary_data_output": True}]))
    body = json.dumps(request, separators=draw(st.sampled_from([(",", ":"), (", ", ": ")]))
                      ).encode()
    if draw(sometimes):
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.sampled_from(
            [b"", b" ", b"[", b"]", b",", b"{", b"}", b'"data": [1],', b'"id": 1,', b"\\",
             b"\xef\xbb\xbf", b"\x00", b"1", b"-"])) + body[at + draw(st.integers(0, 2)):]
    return body


@given(v2_bodies())
@settings(max_examples=400, deadline=None)
def test_a_json_request_read_at_c_speed_is_decoded_exactly_as_the_whole_decoding_does(
        body: bytes) -> None:
    fast = _outcome(body)
    with patch("gateway.protocols.v2_codec._fast_request", return_value=None):
        whole = _outcome(body)
    assert fast == whole, body


def test_the_usual_json_request_is_read_at_c_speed() -> None:
    rows = np.arange(32 * 4, dtype=np.float64).reshape(32, 4) / 3
    body = orjson.dumps({"id": "r1", "inputs": [{
        "name": "input", "shape": [32, 4], "datatype": "FP64", "data": rows.ravel().tolist()}]})
    request = _fast_request(body)
    assert request is not None and request["id"] == "r1"
    assert type(request["inputs"][0]["data"]) is np.ndarray
    assert decode(body).rows.tobytes() == rows.tobytes()
    for other in (body.replace(b'"FP64"', b'"INT64"'), body.replace(b'"id"', b'"outputs"'),
                  body.replace(b'[32,4]', b'[[32],[4]]'), b"\xef\xbb\xbf" + body):
        assert _fast_request(other) is None, other
