"""Open Inference Protocol (KServe V2) over gRPC: ``inference.GRPCInferenceService`` on grpc.aio.

One more door onto the one pipeline: ``ModelInfer`` decodes a request into the same ``Job`` as
the REST door (the protobuf tensors are handed to ``v2_codec.decode_infer_request`` as the REST
binary-tensor form, so the rows and every error message are the REST door's), runs it through
``Gateway.begin`` and ``Gateway.finish`` (L1, Redis, single-flight, cross-replica leases and the
batcher, shared with REST), and encodes the answer as protobuf: ``label`` and ``probabilities``
(``prediction`` for regressors), typed ``contents`` for a request with typed contents, raw
``raw_output_contents`` for a request with ``raw_input_contents``.

Messages are parsed here (the server hands over bytes), so malformed protobuf is
``INVALID_ARGUMENT``, never gRPC's own ``INTERNAL``. Status codes follow the error's HTTP status:
400/422 ``INVALID_ARGUMENT``, 404 ``NOT_FOUND``, 413 ``RESOURCE_EXHAUSTED`` (too many rows; a
message over ``GATEWAY_MAX_BODY_BYTES`` is refused so by gRPC itself), 401 ``UNAUTHENTICATED``,
403 ``PERMISSION_DENIED``, 503 ``UNAVAILABLE`` (overloaded, shutting down; ``retry-after`` in
the trailing metadata), 504 ``DEADLINE_EXCEEDED``; only the gateway's own faults (a model that
raised, a bug) are ``INTERNAL``. The deadline is the call's (``time_remaining``), bounded by the
request's ``timeout`` parameter and ``GATEWAY_REQUEST_TIMEOUT_MS``; the request id is the
``x-request-id`` metadata (else a new one), in the log context and the trailing metadata.

Besides the inference service: the repository extension (``RepositoryIndex``,
``RepositoryModelLoad``, ``RepositoryModelUnload``; the admin token as ``authorization: Bearer``
metadata; other parameters, such as tritonclient's ``unload_dependents``, are ignored, except
``config`` and ``file:*`` overrides, refused), ``grpc.health.v1`` ``Check`` (SERVING while the
gateway is ready, read at each call; ``Watch`` is not served) and server reflection.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextvars import Token
from typing import Any

import grpc
import numpy as np
import orjson
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

from gateway import logs
from gateway.core.pipeline import Answer
from gateway.core.runner import ModelRunner, Output
from gateway.errors import (
    DeadlineExceeded,
    Forbidden,
    GatewayError,
    InvalidInput,
    NotFound,
    TooManyRows,
    Unauthorized,
)
from gateway.metrics import Metrics
from gateway.protocols.http import Decoded, Job
from gateway.protocols.proto import grpc_service_pb2 as pb
from gateway.protocols.v2 import SERVER_NAME, SERVER_VERSION, outputs_of
from gateway.protocols.v2_codec import DTYPES, InferRequest, decode_infer_request
from gateway.runtime import Gateway

__all__ = ["SERVICE", "GrpcServer"]

log = logging.getLogger("gateway.grpc")

SERVICE = "inference.GRPCInferenceService"
_HEALTH_SERVICE = "grpc.health.v1.Health"
_OUTPUT_OF: dict[str, Output] = {"label": "label", "prediction": "label",
                                 "probabilities": "probabilities"}
# The typed contents field of each datatype (FP16 has none: raw contents only).
_FIELD_OF = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
             "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
             "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
             "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}
_CODE_OF_STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT,
                   401: grpc.StatusCode.UNAUTHENTICATED, 403: grpc.StatusCode.PERMISSION_DENIED,
                   404: grpc.StatusCode.NOT_FOUND, 405: grpc.StatusCode.UNIMPLEMENTED,
                   408: grpc.StatusCode.DEADLINE_EXCEEDED,
                   413: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE,
                   504: grpc.StatusCode.DEADLINE_EXCEEDED}

_Handler = Callable[[bytes, Any], Awaitable[bytes]]
_POOL: Any = pb.POOL  # type: ignore[attr-defined]  # the messages' own pool (make proto)


def status_code(exc: GatewayError) -> grpc.StatusCode:
    """The gRPC status of a request that ended with ``exc`` (by its HTTP status)."""
    return _CODE_OF_STATUS.get(exc.status, grpc.StatusCode.INTERNAL)


def _bad(message: str) -> InvalidInput:
    return InvalidInput(message, code="bad_request")


def _serialized(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def _parse(message_type: Any, data: bytes) -> Any:
    """``data`` parsed as ``message_type``; InvalidInput when it is not one."""
    try:
        return message_type.FromString(data)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise _bad(f"malformed {message_type.DESCRIPTOR.name} message: {exc}") from None


def _parameter(p: Any) -> Any:
    """An ``InferParameter``'s value (None when unset)."""
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def _typed_values(tensor: Any) -> Any:
    """The values of a tensor with typed contents: the field of its datatype (anything else set
    is refused); ``[]`` for a datatype without one, whose check is the codec's."""
    datatype = tensor.datatype
    field = _FIELD_OF.get(datatype)
    given = [f.name for f, _ in tensor.contents.ListFields()]
    if datatype == "FP16" and given:
        raise _bad(f"input {tensor.name!r}: FP16 values must be sent as raw_input_contents")
    wrong = [g for g in given if g != field]
    if wrong and datatype in _FIELD_OF:
        raise _bad(f"input {tensor.name!r}: {datatype} values belong in contents.{field}, "
                   f"not contents.{wrong[0]}")
    return getattr(tensor.contents, field) if field is not None else []


def decode_model_infer(request: Any, features: Sequence[str], max_rows: int) -> InferRequest:
    """A ``ModelInferRequest`` decoded as the REST door decodes the same tensors: the rows, the
    outputs asked for, the id and the timeout parameter. Raises InvalidInput with the REST
    door's messages, TooManyRows for a tensor of more than ``max_rows`` rows."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise _bad(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} "
                   "inputs")
    inputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for k, tensor in enumerate(request.inputs):
        entry: dict[str, Any] = {"name": tensor.name, "shape": list(tensor.shape),
                                 "datatype": tensor.datatype}
        if raw:
            if tensor.HasField("contents"):
                raise _bad(f"input {tensor.name!r}: both contents and raw_input_contents "
                           "given")
            blob = raw[k]
        else:
            values = _typed_values(tensor)
            dtype = DTYPES.get(tensor.datatype)
            if dtype is not None and dtype.kind == "f" and values \
                    and not np.isfinite(np.asarray(values, dtype=np.float64)).all():
                blob = np.asarray(values, dtype=dtype).tobytes()  # refused by the row check
            else:
                blob = None
                entry["data"] = list(values) if dtype is not None else []
        if blob is not None:
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        inputs.append(entry)
    header: dict[str, Any] = {"inputs": inputs}
    if request.id:
        header["id"] = request.id
    if request.parameters:
        header["parameters"] = {k: _parameter(v) for k, v in request.parameters.items()}
    if request.outputs:
        header["outputs"] = [{"name": o.name} for o in request.outputs]
    head = orjson.dumps(header)
    try:
        return decode_infer_request(head + b"".join(blobs), str(len(head)) if blobs else None,
                                    features, max_rows)
    except InvalidInput as exc:
        if any(len(t.shape) in (1, 2) and t.shape[0] > max_rows for t in request.inputs):
            raise TooManyRows(exc.message) from None
        raise


def _encode_output(out: Any, raw: list[bytes] | None, datatype: str, values: list[Any]) -> None:
    """``values`` (flat) into ``out`` (an InferOutputTensor), or appended to ``raw``."""
    if datatype == "BYTES":
        strings = [str(v).encode() for v in values]
        if raw is None:
            out.contents.bytes_contents.extend(strings)
        else:
            raw.append(b"".join(len(s).to_bytes(4, "little") + s for s in strings))
    elif raw is not None:
        raw.append(np.asarray(values, dtype=DTYPES[datatype]).tobytes())
    elif datatype == "INT64":
        out.contents.int64_contents.extend(values)
    else:
        out.contents.fp64_contents.extend(values)


class GrpcServer:
    """The gateway's gRPC server: a ``grpc.aio`` server in the running event loop, answering
    through ``gw``. ``start`` binds and starts it; ``stop`` ends it (see the module doc)."""

    def __init__(self, gw: Gateway, metrics: Metrics, *, host: str, port: int,
                 max_connections: int) -> None:
        self._gw = gw
        self._metrics = metrics
        self._decoded = Decoded()
        self._counters: dict[tuple[str, grpc.StatusCode], Any] = {}
        handlers: dict[str, grpc.RpcMethodHandler] = {}
        for name, fn in (("ServerLive", self._server_live), ("ServerReady", self._server_ready),
                         ("ModelReady", self._model_ready),
                         ("ServerMetadata", self._server_metadata),
                         ("ModelMetadata", self._model_metadata),
                         ("ModelInfer", self._model_infer),
                         ("RepositoryIndex", self._repository_index),
                         ("RepositoryModelLoad", self._repository_load),
                         ("RepositoryModelUnload", self._repository_unload)):
            handlers[name] = grpc.unary_unary_rpc_method_handler(self._exchange(name, fn))
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", gw.settings.max_body_bytes),
            ("grpc.max_allowed_incoming_connections", max_connections),
            ("grpc.so_reuseport", 1),  # the workers of `--workers N` share the port
        ])
        self.server.add_generic_rpc_handlers((
            grpc.method_handlers_generic_handler(SERVICE, handlers),
            grpc.method_handlers_generic_handler(_HEALTH_SERVICE, {
                "Check": grpc.unary_unary_rpc_method_handler(
                    self._exchange("Health.Check", self._health_check))}),
        ))
        reflection.enable_server_reflection(
            (SERVICE, _HEALTH_SERVICE, reflection.SERVICE_NAME), self.server,
            pool=_reflection_pool())
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        self.host = host

    async def start(self) -> None:
        """Start serving (the port is bound already: ``port``)."""
        await self.server.start()
        log.info("gRPC (Open Inference Protocol) on %s:%d", self.host, self.port)

    async def stop(self, grace_s: float) -> None:
        """Stop intake (new calls fail ``UNAVAILABLE``), let running calls finish within
        ``grace_s``, then cancel them."""
        await self.server.stop(grace_s)

    # -- one call ------------------------------------------------------------------------------
    def _exchange(self, rpc: str, fn: _Handler) -> _Handler:
        """``fn`` as a handler: request id in the log context, counted and timed by status,
        access-logged, a GatewayError answered with its status code."""
        metrics = self._metrics
        seconds = metrics.grpc_request_seconds.labels(rpc)
        gw = self._gw
        path = f"/{SERVICE}/{rpc}"

        async def handle(request: bytes, context: Any) -> bytes:
            start = time.perf_counter()
            rid = logs.request_id_from(_metadata(context, "x-request-id"))
            token: Token[str] = logs.request_id.set(rid)
            metrics.in_flight += 1
            code = grpc.StatusCode.CANCELLED  # unless it ends otherwise
            trailing = [("x-request-id", rid)]
            try:
                try:
                    reply = await fn(request, context)
                    code = grpc.StatusCode.OK
                    context.set_trailing_metadata(tuple(trailing))
                    return reply
                except GatewayError as exc:
                    gw.count_rejection(exc)
                    code, message = status_code(exc), exc.message
                    if code is grpc.StatusCode.INTERNAL:
                        log.error("%s failed: %s", rpc, message)
                    if "Retry-After" in exc.headers:
                        trailing.append(("retry-after", exc.headers["Retry-After"]))
                except Exception as exc:  # the gateway's own fault: logged, INTERNAL
                    log.error("%s failed", rpc, exc_info=exc)
                    code, message = grpc.StatusCode.INTERNAL, "internal error"
                await context.abort(code, message, tuple(trailing))
                raise AssertionError("unreachable: abort raises")
            finally:
                self._count(rpc, code, seconds, start, path)
                logs.request_id.reset(token)

        return handle

    def _count(self, rpc: str, code: grpc.StatusCode, seconds: Any, start: float,
               path: str) -> None:
        metrics = self._metrics
        elapsed = time.perf_counter() - start
        counter = self._counters.get((rpc, code))
        if counter is None:
            counter = self._counters[(rpc, code)] = metrics.grpc_requests.labels(rpc, code.name)
        metrics.tally.inc(counter)
        metrics.tally.observe(seconds, elapsed)
        metrics.in_flight -= 1
        if self._gw.settings.access_log == "on":
            logs.access("GRPC", path, code.value[0], elapsed)

    # -- health and metadata -----------------------------------------------------------------
    async def _health_check(self, request: bytes, context: Any) -> bytes:
        """``grpc.health.v1`` Check: SERVING while the gateway is ready (``""`` or the
        inference service), NOT_FOUND for another service."""
        req = _parse(health_pb2.HealthCheckRequest, request)
        if req.service not in ("", SERVICE):
            raise NotFound(f"unknown service {req.service!r:.80}", code="unknown_service")
        response = health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING if self._gw.ready
            else health_pb2.HealthCheckResponse.NOT_SERVING)
        return _serialized(response)

    async def _server_live(self, request: bytes, context: Any) -> bytes:
        _parse(pb.ServerLiveRequest, request)
        return _serialized(pb.ServerLiveResponse(live=True))

    async def _server_ready(self, request: bytes, context: Any) -> bytes:
        _parse(pb.ServerReadyRequest, request)
        return _serialized(pb.ServerReadyResponse(ready=self._gw.ready))

    async def _model_ready(self, request: bytes, context: Any) -> bytes:
        req = _parse(pb.ModelReadyRequest, request)
        self._gw.runtime(req.name, req.version or None)
        return _serialized(pb.ModelReadyResponse(ready=self._gw.accepting))

    async def _server_metadata(self, request: bytes, context: Any) -> bytes:
        _parse(pb.ServerMetadataRequest, request)
        return _serialized(pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION,
                                         extensions=["model_repository"]))

    async def _model_metadata(self, request: bytes, context: Any) -> bytes:
        req = _parse(pb.ModelMetadataRequest, request)
        gw = self._gw
        rt = gw.runtime(req.name, req.version or None)
        m = rt.manifest
        versions = ([str(m.version)] if req.version else
                    [str(v) for v in sorted(gw.models[req.name])])
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return _serialized(pb.ModelMetadataResponse(
            name=m.name, versions=versions, platform=m.family,
            inputs=[tensor(name="input", datatype="FP64", shape=[-1, len(m.features)])],
            outputs=[tensor(name=n, datatype=d, shape=s) for n, d, s in outputs_of(rt)]))

    # -- repository --------------------------------------------------------------------------
    def _admin(self, context: Any) -> None:
        """Raises unless the call carries the admin token (``authorization: Bearer``
        metadata, compared in constant time): Forbidden without a token configured,
        Unauthorized when it is missing or wrong."""
        token = self._gw.settings.admin_token
        if token is None:
            raise Forbidden("the model repository API is disabled: set GATEWAY_ADMIN_TOKEN to "
                            "enable it")
        given = _metadata(context, "authorization") or b""
        scheme, _, value = given.partition(b" ")
        expected = token.get_secret_value().encode()
        if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), expected):
            raise Unauthorized("a valid 'authorization: Bearer <token>' metadata entry is "
                               "required")

    async def _repository_index(self, request: bytes, context: Any) -> bytes:
        req = _parse(pb.RepositoryIndexRequest, request)
        self._admin(context)
        index = pb.RepositoryIndexResponse.ModelIndex
        return _serialized(pb.RepositoryIndexResponse(models=[
            index(**entry) for entry in self._gw.registry.index()
            if not req.ready or entry["state"] == "READY"]))

    async def _repository_load(self, request: bytes, context: Any) -> bytes:
        req = _parse(pb.RepositoryModelLoadRequest, request)
        await self._change(context, "load", req)
        return _serialized(pb.RepositoryModelLoadResponse())

    async def _repository_unload(self, request: bytes, context: Any) -> bytes:
        req = _parse(pb.RepositoryModelUnloadRequest, request)
        await self._change(context, "unload", req)
        return _serialized(pb.RepositoryModelUnloadResponse())

    async def _change(self, context: Any, op: str, req: Any) -> None:
        self._admin(context)
        unsupported = [k for k in req.parameters if k == "config" or k.startswith("file:")]
        if unsupported:
            raise _bad(f"repository {op}: parameter {unsupported[0]!r:.40} is not supported "
                       "(models come from the store as they are)")
        await self._gw.change_repository(op, req.model_name)

    # -- inference ---------------------------------------------------------------------------
    async def _model_infer(self, request: bytes, context: Any) -> bytes:
        gw = self._gw
        job = self._prepare(request, context)
        (begun,) = gw.begin([(job.rt, job.rows, job.outputs)])
        if isinstance(begun, GatewayError):
            raise begun
        if isinstance(begun, Answer):
            return self._encode(job, begun)
        return self._encode(job, await gw.finish(begun, job.timeout_s))

    def _prepare(self, request: bytes, context: Any) -> Job:
        """The request as a ``Job``; ``extra`` is (decoded request, output names, raw)."""
        gw = self._gw
        seen = self._decoded.find(request)
        rt: ModelRunner | None = None
        if seen is not None:
            name, version, ireq, raw = seen[1]
            rt = gw.runtime(name, version)
            if seen[0] != rt.manifest.features:
                rt = None
        if rt is None:
            req = _parse(pb.ModelInferRequest, request)
            name, version, raw = req.model_name, req.model_version or None, \
                bool(req.raw_input_contents)
            rt = gw.runtime(name, version)
            ireq = decode_model_infer(req, rt.manifest.features, gw.settings.max_rows)
            self._decoded.keep(request, len(request), rt.manifest.features,
                               (name, version, ireq, raw), ireq.rows)
        available = {n: (d, s) for n, d, s in outputs_of(rt)}
        names = [s.name for s in ireq.outputs] if ireq.outputs else list(available)
        for n in names:
            if n not in available:
                raise InvalidInput(f"unknown output {n!r:.40} (this model has "
                                   f"{', '.join(available)})", code="bad_request")
        timeout_s = (ireq.timeout_us / 1e6 if ireq.timeout_us is not None
                     else gw.settings.request_timeout_ms / 1000)
        remaining = context.time_remaining()
        if remaining is not None:
            if remaining <= 0:
                raise DeadlineExceeded("the call's deadline has passed")
            timeout_s = min(timeout_s, remaining)
        wanted = frozenset(_OUTPUT_OF[n] for n in names)
        return Job(rt, ireq.rows, wanted, timeout_s, (ireq, names, available, raw))

    def _encode(self, job: Job, answer: Answer) -> bytes:
        ireq, names, available, raw = job.extra
        m = job.rt.manifest
        n = len(ireq.rows)
        response = pb.ModelInferResponse(model_name=m.name, model_version=str(m.version),
                                         id=ireq.request_id or "")
        blobs: list[bytes] | None = [] if raw else None
        for name in names:
            datatype, shape = available[name]
            rows = answer.values[_OUTPUT_OF[name]]
            flat = (b"[" + b",".join([r[1:-1] for r in rows]) + b"]" if len(shape) > 1
                    else b"[" + b",".join(rows) + b"]")
            out = response.outputs.add(name=name, datatype=datatype, shape=[n, *shape[1:]])
            _encode_output(out, blobs, datatype, orjson.loads(flat))
        if blobs is not None:
            response.raw_output_contents.extend(blobs)
        return _serialized(response)


def _reflection_pool() -> Any:
    """The descriptor pool reflection answers from: the one of our messages (a pool of their
    own, see the Makefile's ``proto``), with the health service's file added once."""
    name = health_pb2.DESCRIPTOR.name
    try:
        _POOL.FindFileByName(name)
    except KeyError:
        _POOL.AddSerializedFile(health_pb2.DESCRIPTOR.serialized_pb)
    return _POOL


def _metadata(context: Any, key: str) -> bytes | None:
    """The last value of metadata ``key`` (lower-case) of the call, as bytes, or None."""
    found = None
    for k, v in context.invocation_metadata() or ():
        if k == key:
            found = v.encode("latin-1", "replace") if isinstance(v, str) else v
    return found
