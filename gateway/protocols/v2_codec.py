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
import simdjson

from gateway.errors import InvalidInput
from gateway.protocols.inputs import json_document, only_fields, parse_json

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
_FLOATING = frozenset({"FP16", "FP32", "FP64"})
_FAST_TOP = frozenset({"inputs", "id"})
_FAST_INPUT = frozenset({"name", "shape", "datatype", "data"})


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
_INTEGRAL = frozenset({int})
_NUMBERS = frozenset({int, float})
_FLOAT = frozenset({float})

# (name, shape, values as float64) of one decoded input.
_Tensor = tuple[str, list[int], np.ndarray]


def _bad(message: str) -> InvalidInput:
    return InvalidInput(message, code="bad_request")


def decode_infer_request(
    body: bytes,
    header_length: bytes | str | None,
    features: Sequence[str],
    max_rows: int,
) -> InferRequest:
    """Rows and requested outputs of one infer request for a model with ``features``.

    Three steps, each done (and its errors raised) before the next starts, so a request with
    several faults is refused for the first one found in this order: framing (split the body
    at ``header_length``, parse the JSON header), tensors (each input in order, then the rows
    they make), outputs (``parameters``, requested ``outputs``, ``id``, ``parameters.timeout``).
    Output names are not checked here: the caller knows the model's outputs.

    Raises:
        MalformedJson: the JSON header does not parse.
        InvalidInput: anything else wrong (shape, datatype, sizes, missing or extra bytes,
            non-finite values, too many rows, malformed outputs, id or timeout).
    """
    header, binary = _split_body(body, header_length)
    request = (_fast_request(header) if not binary else None) or _parse_header(header)
    tensors = _decode_inputs(request.get("inputs"), binary, len(features), max_rows)
    rows = _assemble(tensors, features, max_rows)
    params = _request_parameters(request.get("parameters"))
    binary_default = params.get("binary_data_output") is True
    outputs = _requested_outputs(request.get("outputs"), binary_default)
    request_id = _request_id(request.get("id"))
    timeout_us = _timeout_us(params.get("timeout"))
    return InferRequest(rows, outputs, binary_default, request_id, timeout_us)


# -- framing -----------------------------------------------------------------------------------
def _split_body(body: bytes, header_length: bytes | str | None) -> tuple[bytes, bytes]:
    """``body`` as (JSON header, binary part): all of it is JSON when ``header_length`` is None,
    else the first ``header_length`` bytes are. Refuses a length that is not 1 to 18 ASCII
    digits, is zero, or is longer than the body."""
    if header_length is None:
        return body, b""
    raw = (header_length.encode("latin-1") if isinstance(header_length, str)
           else header_length)
    if not (0 < len(raw) <= _MAX_LENGTH_DIGITS and raw.isdigit()
            and 0 < int(raw) <= len(body)):
        raise _bad(f"Inference-Header-Content-Length {raw.decode('latin-1')!r:.30} does "
                   f"not fit a body of {len(body)} bytes")
    cut = int(raw)
    return body[:cut], body[cut:]


def _fast_request(body: bytes) -> dict[str, Any] | None:
    """The usual JSON request read at C speed: ``{"inputs": [input], "id"?: …}``, the input
    naming just its ``name``, ``shape``, a floating-point ``datatype`` and flat ``data`` of
    numbers, no string escaped. What ``_parse_header`` makes of it, but for ``data``: a float64
    array rather than a list of Python numbers. None for any other body, valid or not:
    ``_parse_header`` reads it then."""
    if b"\\" in body or body.count(b"{") != 2 or body.count(b"[") != 3:
        return None  # (two objects; lists: inputs, shape, data)
    doc = json_document(body)
    inputs: Any = None
    tensor: Any = None
    shape: Any = None
    data: Any = None
    try:
        if type(doc) is not simdjson.Object or not only_fields(doc, _FAST_TOP):
            return None
        inputs = doc.get("inputs")
        if type(inputs) is not simdjson.Array or len(inputs) != 1:
            return None
        tensor = inputs[0]
        if type(tensor) is not simdjson.Object or not only_fields(tensor, _FAST_INPUT) \
                or len(tensor) != len(_FAST_INPUT):
            return None
        name, datatype = tensor.get("name"), tensor.get("datatype")
        shape, data = tensor.get("shape"), tensor.get("data")
        if (type(name) is not str or datatype not in _FLOATING
                or type(shape) is not simdjson.Array or type(data) is not simdjson.Array):
            return None
        dims = list(shape)  # (scalars: the only lists are inputs, shape and data)
        try:
            values = np.frombuffer(data.as_buffer(of_type="d"), dtype=np.float64)
        except TypeError:  # a value that is not a number
            return None
        request: dict[str, Any] = {"inputs": [
            {"name": name, "shape": dims, "datatype": datatype, "data": values}]}
        if "id" in doc:
            request["id"] = doc.get("id")
        return request
    finally:
        del doc, inputs, tensor, shape, data  # the parser's documents are one at a time


def _parse_header(header: bytes) -> dict[str, Any]:
    """The JSON header as a dict. Raises MalformedJson when it does not parse (or names a key
    twice in one object), InvalidInput when it is not an object."""
    request = parse_json(header, "inference header")
    if not isinstance(request, dict):
        raise _bad("inference request must be a JSON object")
    return request


# -- tensors -----------------------------------------------------------------------------------
def _decode_inputs(inputs: Any, binary: bytes, n_features: int, max_rows: int) -> list[_Tensor]:
    """Each of ``inputs`` (the request's non-empty list) decoded, in order; binary inputs take
    their bytes from ``binary`` one after another, and every byte of it must be taken."""
    if not isinstance(inputs, list) or not inputs:
        raise _bad("'inputs' must be a non-empty list")
    tensors = []
    offset = 0
    for tensor in inputs:
        decoded, size = _decode_input(tensor, binary, offset, n_features, max_rows)
        tensors.append(decoded)
        offset += size
    if offset != len(binary):
        raise _bad(f"{len(binary) - offset} bytes after the last input's binary data")
    return tensors


def _decode_input(tensor: Any, binary: bytes, offset: int, n_features: int,
                  max_rows: int) -> tuple[_Tensor, int]:
    """One input object decoded, with how many bytes of ``binary`` (from ``offset``) it took:
    its values come from ``binary`` when ``parameters.binary_data_size`` is given, else from
    JSON ``data``, never both. Absent or false-y ``parameters`` count as {}."""
    name, shape, datatype, count = _input_header(tensor, n_features, max_rows)
    params = tensor.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad(f"input {name!r}: 'parameters' must be an object")
    size = params.get("binary_data_size")
    if size is None:
        if "data" not in tensor:
            raise _bad(f"input {name!r}: no 'data' and no binary_data_size")
        return (name, shape, _json_values(tensor["data"], name, count, datatype)), 0
    _check_binary_size(size, name, shape, datatype, count, len(binary) - offset)
    if "data" in tensor:
        raise _bad(f"input {name!r}: both 'data' and binary_data_size given")
    values = np.frombuffer(binary, dtype=DTYPES[datatype], count=count, offset=offset)
    return (name, shape, values.astype(np.float64)), size  # a copy: rows never view the body


def _input_header(tensor: Any, n_features: int,
                  max_rows: int) -> tuple[str, list[int], str, int]:
    """An input's name, shape, datatype and value count, the shape ``[n]`` or ``[n, k]`` with
    ``n <= max_rows`` holding at most ``max_rows * n_features`` values."""
    if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
        raise _bad("each input must be an object with a 'name'")
    name: str = tensor["name"]
    shape = _shape(tensor.get("shape"), name)
    datatype = _datatype(tensor.get("datatype"), name)
    if len(shape) not in (1, 2) or (shape and shape[0] > max_rows):
        raise _bad(f"input {name!r}: shape {shape} must be [n, {n_features}] or [n, 1] "
                   f"with n <= {max_rows}")
    count = math.prod(shape)
    if count > max_rows * n_features:
        raise _bad(f"input {name!r}: shape {shape} holds more than {max_rows} rows")
    return name, shape, datatype, count


def _shape(shape: Any, name: str) -> list[int]:
    """``shape`` as given, once known to be a list of non-negative integers."""
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise _bad(f"input {name!r}: 'shape' must be a list of integers")
    if any(d < 0 for d in shape):
        raise _bad(f"input {name!r}: negative dimension in shape {shape}")
    return shape


def _datatype(datatype: Any, name: str) -> str:
    """``datatype`` as given, once known to be one of ``DTYPES``."""
    if type(datatype) is not str:
        raise _bad(f"input {name!r}: datatype must be a string (one of {', '.join(DTYPES)})")
    if datatype in _NOT_NUMERIC:
        raise _bad(f"input {name!r}: datatype {datatype} is not numeric; this model takes "
                   f"numbers ({', '.join(DTYPES)})")
    if datatype not in DTYPES:
        raise _bad(f"input {name!r}: datatype {datatype!r:.20} not supported "
                   f"(use one of {', '.join(DTYPES)})")
    return str(datatype)


def _check_binary_size(size: Any, name: str, shape: list[int], datatype: str, count: int,
                       available: int) -> None:
    """Refuses a ``binary_data_size`` that is not the size of ``count`` values of ``datatype``
    or is more than the ``available`` bytes left in the body."""
    if type(size) is not int or size < 0:
        raise _bad(f"input {name!r}: binary_data_size must be a non-negative integer")
    expected = count * DTYPES[datatype].itemsize
    if size != expected:
        raise _bad(f"input {name!r}: binary_data_size {size} does not match shape "
                   f"{shape} of {datatype} ({expected} bytes)")
    if size > available:
        raise _bad(f"input {name!r}: body ends {size - available} bytes "
                   "short of its binary data")


def _json_values(data: Any, name: str, count: int, datatype: str) -> np.ndarray:
    """JSON ``data`` (flat or nested) as ``count`` float64 values, each an integer (FP types:
    a number) that ``datatype`` holds; FP32 and FP16 round as they would in binary, and a
    value past their range becomes inf, which ``_assemble`` refuses."""
    # An array holds float64 numbers already (``_fast_request``: FP datatypes only).
    flat, types = (data, _FLOAT) if type(data) is np.ndarray else _flatten(data, name)
    if len(flat) != count:
        raise _bad(f"input {name!r}: shape holds {count} values, 'data' has {len(flat)}")
    integral = not datatype.startswith("FP")
    allowed = _INTEGRAL if integral else _NUMBERS
    if not types <= allowed:
        wrong = next(v for v in flat if type(v) not in allowed)
        kind = "an integer" if integral else "a number"
        raise _bad(f"input {name!r}: {datatype} 'data' holds {wrong!r}, not {kind}")
    dtype = DTYPES[datatype]
    try:
        if dtype.kind == "f" and dtype.itemsize < 8:  # past FP32/FP16 range: inf, refused later
            with np.errstate(over="ignore"):
                values = np.asarray(flat, dtype=dtype)
        else:
            values = np.asarray(flat, dtype=dtype)
    except OverflowError:
        raise _bad(f"input {name!r}: a value is out of {datatype} range") from None
    return values.astype(np.float64, copy=False)


def _flatten(data: Any, name: str) -> tuple[list[Any], set[type]]:
    """``data``, flat or nested (row-major, lists at most four levels inside it), as one flat
    list (``data`` itself when it is flat), with the set of its values' types: each level is
    looked at once, which is all a flat list costs."""
    if not isinstance(data, list):
        raise _bad(f"input {name!r}: 'data' must be a list")
    flat = data
    types = set(map(type, flat))
    for _ in range(4):
        if list not in types:
            return flat, types
        flat = [w for v in flat for w in (v if type(v) is list else (v,))]
        types = set(map(type, flat))
    if list in types:
        raise _bad(f"input {name!r}: 'data' is nested too deeply")
    return flat, types


def _assemble(tensors: list[_Tensor], features: Sequence[str], max_rows: int) -> np.ndarray:
    """The rows the inputs make, as a contiguous (n, n_features) float64 array with
    0 < n <= max_rows, every value finite: one [n, n_features] tensor, or one [n] or [n, 1]
    tensor named after each feature (in any order)."""
    if len(tensors) == 1 and not (len(features) > 1 and tensors[0][0] in features):
        rows = _rows_of_one_tensor(tensors[0], features)
    else:
        rows = _rows_by_feature(tensors, features)
    if len(rows) == 0:
        raise _bad("at least one row is required")
    if len(rows) > max_rows:
        raise _bad(f"{len(rows)} rows exceed the limit of {max_rows}")
    rows = np.ascontiguousarray(rows, dtype=np.float64)
    finite = np.isfinite(rows)
    if np.count_nonzero(finite) != finite.size:  # cheaper than finite.all() on small arrays
        r, c = map(int, np.argwhere(~finite)[0])
        raise _bad(f"row {r}, feature {features[c]!r}: {rows[r, c]} is not a finite number")
    return rows


def _rows_of_one_tensor(tensor: _Tensor, features: Sequence[str]) -> np.ndarray:
    """The values of a ``[n, n_features]`` tensor as n rows."""
    name, shape, values = tensor
    n_features = len(features)
    if len(shape) != 2 or shape[1] != n_features:
        raise _bad(f"input {name!r}: shape {shape} must be [n, {n_features}] "
                   f"({', '.join(features)})")
    return values.reshape(shape[0], n_features)


def _rows_by_feature(tensors: list[_Tensor], features: Sequence[str]) -> np.ndarray:
    """Rows from one ``[n]`` or ``[n, 1]`` tensor per feature, each feature exactly once and
    nothing else, all of one length."""
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
    return np.stack([by_name[f] for f in features], axis=1)


# -- outputs -----------------------------------------------------------------------------------
def _request_parameters(params: Any) -> dict[str, Any]:
    """The request's ``parameters`` object; absent or false-y (null, false, 0, "", []) is {}."""
    params = params or {}
    if not isinstance(params, dict):
        raise _bad("'parameters' must be an object")
    return params


def _requested_outputs(outputs: Any, binary_default: bool) -> tuple[OutputSpec, ...] | None:
    """The request's ``outputs`` (None when not given), each binary as its
    ``parameters.binary_data`` says, else as ``binary_default``. Names are not checked here."""
    if outputs is None:
        return None
    if not isinstance(outputs, list):
        raise _bad("'outputs' must be a list")
    specs = []
    for out in outputs:
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise _bad("each requested output must be an object with a 'name'")
        p = out.get("parameters") or {}
        binary_flag = p.get("binary_data", binary_default) if isinstance(p, dict) else None
        if not isinstance(binary_flag, bool):
            raise _bad(f"output {out['name']!r}: binary_data must be true or false")
        specs.append(OutputSpec(out["name"], binary_flag))
    return tuple(specs)


def _request_id(request_id: Any) -> str | None:
    """The request's ``id``: a string, or None."""
    if request_id is not None and not isinstance(request_id, str):
        raise _bad("'id' must be a string")
    return request_id


def _timeout_us(timeout: Any) -> int | None:
    """``parameters.timeout``: a positive integer of microseconds, or None."""
    if timeout is not None and (type(timeout) is not int or timeout <= 0):
        raise _bad("parameters.timeout must be a positive integer (microseconds)")
    return timeout


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
