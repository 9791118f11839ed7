"""Open Inference Protocol (KServe V2) REST: decoding infer requests, encoding responses.

Pure functions over bytes, with the binary tensor data extension: a JSON header (its length in
the ``Inference-Header-Content-Length`` header) followed by each binary input's little-endian,
row-major bytes, in input order, sized by ``parameters.binary_data_size``. Every size is
checked against the shape and the bytes actually present before anything is allocated.
Errors raise ``InvalidInput`` with a message naming the input and the problem.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from gateway.errors import InvalidInput
from gateway.protocols.inputs import parse_json

__all__ = ["DTYPES", "InferRequest", "OutputSpec", "decode_infer_request",
           "encode_infer_response"]

# Input datatypes accepted, with their little-endian numpy dtype.
DTYPES: dict[str, np.dtype[Any]] = {
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_NOT_NUMERIC = frozenset({"BYTES", "BOOL"})


@dataclass(frozen=True, slots=True)
class OutputSpec:
    name: str
    binary: bool


@dataclass(frozen=True, slots=True)
class InferRequest:
    rows: np.ndarray  # (n, n_features) float64, finite
    outputs: tuple[OutputSpec, ...] | None  # None: every output, binary per `binary_default`
    binary_default: bool
    request_id: str | None
    timeout_us: int | None


_MAX_LENGTH_DIGITS = 18


def _bad(message: str) -> InvalidInput:
    return InvalidInput(message, code="bad_request")


def _shape(tensor: dict[str, Any], name: str) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise _bad(f"input {name!r}: 'shape' must be a list of integers")
    if any(d < 0 for d in shape):
        raise _bad(f"input {name!r}: negative dimension in shape {shape}")
    return shape


def _flatten(data: Any, name: str) -> list[Any]:
    """``data`` flat or nested (row-major), as one flat list."""
    if not isinstance(data, list):
        raise _bad(f"input {name!r}: 'data' must be a list")
    out: list[Any] = []

    def walk(items: list[Any], depth: int) -> None:
        if depth > 4:
            raise _bad(f"input {name!r}: 'data' is nested too deeply")
        for v in items:
            if isinstance(v, list):
                walk(v, depth + 1)
            else:
                out.append(v)

    walk(data, 0)
    return out


def _json_values(data: Any, name: str, count: int, datatype: str) -> np.ndarray:
    """JSON ``data`` as values of ``datatype`` (FP32 rounds as it would in binary)."""
    flat = _flatten(data, name)
    if len(flat) != count:
        raise _bad(f"input {name!r}: shape holds {count} values, 'data' has {len(flat)}")
    integral = not datatype.startswith("FP")
    allowed = (int,) if integral else (int, float)
    for v in flat:
        if type(v) not in allowed:
            kind = "an integer" if integral else "a number"
            raise _bad(f"input {name!r}: {datatype} 'data' holds {v!r}, not {kind}")
    dtype = DTYPES[datatype]
    try:
        with np.errstate(over="ignore"):
            values = np.asarray(flat, dtype=dtype)
    except OverflowError:
        raise _bad(f"input {name!r}: a value is out of {datatype} range") from None
    return values.astype(np.float64)


def decode_infer_request(
    body: bytes,
    header_length: bytes | str | None,
    features: Sequence[str],
    max_rows: int,
) -> InferRequest:
    """Rows and requested outputs of one infer request for a model with ``features``.

    Raises:
        MalformedJson: the JSON header does not parse.
        InvalidInput: anything else wrong (shape, datatype, sizes, missing or extra bytes,
            non-finite values, too many rows, unknown outputs).
    """
    if header_length is None:
        json_part, binary = body, b""
    else:
        raw = (header_length.encode("latin-1") if isinstance(header_length, str)
               else header_length)
        if not (0 < len(raw) <= _MAX_LENGTH_DIGITS and raw.isdigit()
                and 0 < int(raw) <= len(body)):
            raise _bad(f"Inference-Header-Content-Length {raw.decode('latin-1')!r:.30} does "
                       f"not fit a body of {len(body)} bytes")
        cut = int(raw)
        json_part, binary = body[:cut], body[cut:]
    request = parse_json(json_part, "inference header")
    if not isinstance(request, dict):
        raise _bad("inference request must be a JSON object")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _bad("'inputs' must be a non-empty list")

    n_features = len(features)
    tensors: list[tuple[str, list[int], np.ndarray]] = []
    offset = 0
    for tensor in inputs:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise _bad("each input must be an object with a 'name'")
        name = tensor["name"]
        shape = _shape(tensor, name)
        datatype = tensor.get("datatype")
        if datatype in _NOT_NUMERIC:
            raise _bad(f"input {name!r}: datatype {datatype} is not numeric; this model takes "
                       f"numbers ({', '.join(DTYPES)})")
        if datatype not in DTYPES:
            raise _bad(f"input {name!r}: datatype {datatype!r:.20} not supported "
                       f"(use one of {', '.join(DTYPES)})")
        if len(shape) not in (1, 2) or (shape and shape[0] > max_rows):
            raise _bad(f"input {name!r}: shape {shape} must be [n, {n_features}] or [n, 1] "
                       f"with n <= {max_rows}")
        count = math.prod(shape)
        if count > max_rows * n_features:
            raise _bad(f"input {name!r}: shape {shape} holds more than {max_rows} rows")
        params = tensor.get("parameters") or {}
        if not isinstance(params, dict):
            raise _bad(f"input {name!r}: 'parameters' must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            dtype = DTYPES[datatype]
            if type(size) is not int or size < 0:
                raise _bad(f"input {name!r}: binary_data_size must be a non-negative integer")
            if size != count * dtype.itemsize:
                raise _bad(f"input {name!r}: binary_data_size {size} does not match shape "
                           f"{shape} of {datatype} ({count * dtype.itemsize} bytes)")
            if offset + size > len(binary):
                raise _bad(f"input {name!r}: body ends {offset + size - len(binary)} bytes "
                           "short of its binary data")
            if "data" in tensor:
                raise _bad(f"input {name!r}: both 'data' and binary_data_size given")
            values = np.frombuffer(binary, dtype=dtype, count=count, offset=offset)
            offset += size
            values = values.astype(np.float64)
        else:
            if "data" not in tensor:
                raise _bad(f"input {name!r}: no 'data' and no binary_data_size")
            values = _json_values(tensor["data"], name, count, datatype)
        tensors.append((name, shape, values))
    if offset != len(binary):
        raise _bad(f"{len(binary) - offset} bytes after the last input's binary data")

    rows = _assemble(tensors, features, max_rows)
    bad = ~np.isfinite(rows)
    if bad.any():
        r, c = map(int, np.argwhere(bad)[0])
        raise _bad(f"row {r}, feature {features[c]!r}: {rows[r, c]} is not a finite number")

    outputs = request.get("outputs")
    specs: tuple[OutputSpec, ...] | None = None
    req_params = request.get("parameters") or {}
    if not isinstance(req_params, dict):
        raise _bad("'parameters' must be an object")
    binary_default = req_params.get("binary_data_output") is True
    if outputs is not None:
        if not isinstance(outputs, list):
            raise _bad("'outputs' must be a list")
        parsed = []
        for out in outputs:
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise _bad("each requested output must be an object with a 'name'")
            p = out.get("parameters") or {}
            binary_flag = p.get("binary_data", binary_default) if isinstance(p, dict) else None
            if not isinstance(binary_flag, bool):
                raise _bad(f"output {out['name']!r}: binary_data must be true or false")
            parsed.append(OutputSpec(out["name"], binary_flag))
        specs = tuple(parsed)
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _bad("'id' must be a string")
    timeout = req_params.get("timeout")
    if timeout is not None and (type(timeout) is not int or timeout <= 0):
        raise _bad("parameters.timeout must be a positive integer (microseconds)")
    return InferRequest(rows, specs, binary_default, request_id, timeout)


def _assemble(tensors: list[tuple[str, list[int], np.ndarray]], features: Sequence[str],
              max_rows: int) -> np.ndarray:
    n_features = len(features)
    if len(tensors) == 1 and not (n_features > 1 and tensors[0][0] in features):
        name, shape, values = tensors[0]
        if len(shape) != 2 or shape[1] != n_features:
            raise _bad(f"input {name!r}: shape {shape} must be [n, {n_features}] "
                       f"({', '.join(features)})")
        n = shape[0]
        rows = values.reshape(n, n_features)
    else:
        by_name = {}
        for name, shape, values in tensors:
            if name not in features:
                raise _bad(f"input {name!r} is not a feature of this model "
                           f"({', '.join(features)})")
            if name in by_name:
                raise _bad(f"input {name!r} given twice")
            if not (len(shape) == 1 or shape[1] == 1):
                raise _bad(f"input {name!r}: shape {shape} must be [n] or [n, 1]")
            by_name[name] = values
        missing = [f for f in features if f not in by_name]
        if missing:
            raise _bad(f"missing feature input(s): {', '.join(missing)}")
        lengths = {len(v) for v in by_name.values()}
        if len(lengths) != 1:
            raise _bad(f"feature inputs differ in length: {sorted(lengths)}")
        rows = np.stack([by_name[f] for f in features], axis=1)
    if len(rows) == 0:
        raise _bad("at least one row is required")
    if len(rows) > max_rows:
        raise _bad(f"{len(rows)} rows exceed the limit of {max_rows}")
    return np.ascontiguousarray(rows, dtype=np.float64)


def _bytes_tensor(values: Sequence[Any]) -> bytes:
    parts = []
    for v in values:
        b = str(v).encode()
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


_NUMPY = {"FP64": "<f8", "FP32": "<f4", "INT64": "<i8", "INT32": "<i4"}


def encode_infer_response(
    *,
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: Sequence[tuple[OutputSpec, str, list[int], Sequence[bytes]]],
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header's length.

    ``outputs`` holds ``(spec, datatype, shape, rows)``: ``rows`` has one JSON value per row
    (a scalar, or a list for a ``[n, k]`` output), spliced as it is into JSON ``data`` or
    packed little-endian (BYTES: length-prefixed strings) for binary outputs.
    """
    header: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        header["id"] = request_id
    entries = []
    blobs = []
    for spec, datatype, shape, rows in outputs:
        entry: dict[str, Any] = {"name": spec.name, "datatype": datatype, "shape": shape}
        if len(shape) > 1:  # rows are JSON lists: flatten row-major
            flat = b"[" + b",".join([r[1:-1] for r in rows]) + b"]"
        else:
            flat = b"[" + b",".join(rows) + b"]"
        if spec.binary:
            values = orjson.loads(flat)
            blob = (_bytes_tensor(values) if datatype == "BYTES"
                    else np.asarray(values, dtype=_NUMPY[datatype]).tobytes())
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = orjson.Fragment(flat)
        entries.append(entry)
    header["outputs"] = entries
    head = orjson.dumps(header)
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)
