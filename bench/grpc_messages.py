"""Open Inference Protocol gRPC messages for the bench, serialized before a run.

``ModelInfer`` requests carry one ``[rows, n_features]`` tensor (FP64 or FP32) as
``raw_input_contents``, built with the gateway's generated stubs
(``gateway.protocols.proto``). The rows are the HTTP loads' (``bench.doors``): the ``hot`` row
again and again, or ``unique`` rows never asked before (``unique_rows`` of a salt, so runs never
share a row). ``Bodies`` hands out request ``i`` without building all of them first: the message
is a fixed prefix followed by the tensor's bytes (``raw_input_contents`` is its last field).

``frame`` wraps a message as gRPC sends it on the wire (a flag byte, a big-endian length), the
body h2load posts. ``check_answer`` decodes a ``ModelInferResponse`` and says what is wrong with
it, if anything.
"""

from __future__ import annotations

import numpy as np
from google.protobuf.message import DecodeError

from bench.doors import hot_row, unique_rows
from gateway.protocols.proto import grpc_service_pb2 as pb

__all__ = ["INFER", "Bodies", "check_answer", "frame", "infer_request"]

INFER = "/inference.GRPCInferenceService/ModelInfer"
"""The HTTP/2 path of ``ModelInfer``."""
_DTYPES = {"FP64": "<f8", "FP32": "<f4"}
_CHUNK = 4096  # unique rows are computed this many requests at a time


def infer_request(model: str, rows: np.ndarray, *, input_name: str = "input",
                  datatype: str = "FP64") -> bytes:
    """A serialized ``ModelInferRequest`` asking ``model`` about ``rows`` (2-D) as one raw
    ``datatype`` tensor; every output the model has is answered."""
    if datatype not in _DTYPES:
        raise ValueError(f"datatype must be FP64 or FP32, got {datatype!r}")
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=input_name, datatype=datatype, shape=list(rows.shape))
    request.raw_input_contents.append(np.ascontiguousarray(rows, _DTYPES[datatype]).tobytes())
    data: bytes = request.SerializeToString()
    return data


def frame(message: bytes) -> bytes:
    """``message`` as one uncompressed gRPC length-prefixed message."""
    return b"\0" + len(message).to_bytes(4, "big") + message


class Bodies:
    """The requests of one load: ``hot`` (one row, ``rows`` times per request, always the same
    bytes) or ``unique`` (``rows`` new rows per request, distinct for each index below
    ``2**32 // rows`` and each ``salt``).

    ``bodies[i]`` is request ``i``'s serialized message; unique rows are computed a chunk of
    requests at a time, as they are first asked for.
    """

    def __init__(self, keys: str, model: str, n_features: int, *, rows: int = 1, salt: int = 0,
                 input_name: str = "input", datatype: str = "FP64") -> None:
        if keys not in ("hot", "unique"):
            raise ValueError(f"keys must be hot or unique, got {keys!r}")
        if rows < 1 or n_features < 1:
            raise ValueError("rows and features per request must be >= 1")
        self.keys, self.rows, self.n_features, self.salt = keys, rows, n_features, salt
        self._hot = infer_request(model, np.repeat(hot_row(n_features), rows, axis=0),
                                  input_name=input_name, datatype=datatype)
        self._dtype = np.dtype(_DTYPES[datatype])
        self._prefix = self._hot[:len(self._hot) - rows * n_features * self._dtype.itemsize]
        self._chunk_at = -1
        self._chunk: list[bytes] = []

    def __getitem__(self, i: int) -> bytes:
        if self.keys == "hot":
            return self._hot
        start = i - i % _CHUNK
        if start != self._chunk_at:
            per, f = self.rows, self.n_features
            block = unique_rows(self.salt, start * per, _CHUNK * per, f)
            raw = np.ascontiguousarray(block, self._dtype).reshape(_CHUNK, per * f)
            self._chunk = [self._prefix + r.tobytes() for r in raw]
            self._chunk_at = start
        return self._chunk[i - start]


def check_answer(data: bytes, rows: int) -> str | None:
    """What is wrong with ``data`` as the ``ModelInferResponse`` to a request of ``rows`` rows:
    None when it parses and each output is a tensor of ``rows`` rows whose values are all
    there (raw or typed)."""
    try:
        response = pb.ModelInferResponse.FromString(data)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        return f"not a ModelInferResponse: {exc}"
    if not response.outputs:
        return "no outputs"
    raw = response.raw_output_contents
    if raw and len(raw) != len(response.outputs):
        return f"{len(raw)} raw contents for {len(response.outputs)} outputs"
    for k, out in enumerate(response.outputs):
        if not out.shape or out.shape[0] != rows:
            return f"output {out.name!r} has shape {list(out.shape)}, not {rows} rows"
        if not (raw[k] if raw else out.contents.ListFields()):
            return f"output {out.name!r} has no values"
    return None
