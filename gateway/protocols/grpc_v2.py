"""Open Inference Protocol (KServe V2) over gRPC: ``inference.GRPCInferenceService``.

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
message over ``GATEWAY_MAX_BODY_BYTES`` is refused so by the transport), 401 ``UNAUTHENTICATED``,
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
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from contextvars import Token
from typing import Any

import grpc
import numpy as np
import orjson
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from gateway import logs
from gateway.core.pipeline import Answer, Pending
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
from gateway.protocols.grpc_wire import Call, Outcome, StepHandler, UnaryHandler, WireServer
from gateway.protocols.http import Decoded, Job
from gateway.protocols.proto import grpc_service_pb2 as pb
from gateway.protocols.v2 import SERVER_NAME, SERVER_VERSION, outputs_of
from gateway.protocols.v2_codec import DTYPES, InferRequest, decode_infer_request
from gateway.runtime import Gateway
from gateway.tracing import RequestTrace, current

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

_Handler = Callable[[bytes, Call], bytes | Awaitable[bytes]]
_REFLECTION_SERVICE = reflection.SERVICE_NAME
_SERVER_FAULTS = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
                            grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.DATA_LOSS})
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
    """The gateway's gRPC server: the door's handlers on the HTTP/2 transport of
    ``gateway.protocols.grpc_wire``, in the running event loop, answering through ``gw``.
    ``start`` binds and starts it; ``stop`` ends it (see the module doc)."""

    def __init__(self, gw: Gateway, metrics: Metrics, *, host: str, port: int,
                 max_connections: int) -> None:
        self._gw = gw
        self._metrics = metrics
        self._decoded = Decoded()
        self._counters: dict[tuple[str, grpc.StatusCode], Any] = {}
        self._seconds: dict[str, Any] = {}
        unary: dict[str, UnaryHandler] = {}
        for name, fn in (("ServerLive", self._server_live), ("ServerReady", self._server_ready),
                         ("ModelReady", self._model_ready),
                         ("ServerMetadata", self._server_metadata),
                         ("ModelMetadata", self._model_metadata),
                         ("ModelInfer", self._model_infer),
                         ("RepositoryIndex", self._repository_index),
                         ("RepositoryModelLoad", self._repository_load),
                         ("RepositoryModelUnload", self._repository_unload)):
            unary[f"/{SERVICE}/{name}"] = self._exchange(name, fn)
        unary[f"/{_HEALTH_SERVICE}/Check"] = self._exchange("Health.Check", self._health_check)
        reflect = _Reflection((SERVICE, _HEALTH_SERVICE, _REFLECTION_SERVICE))
        steps: dict[str, StepHandler] = ({f"/{SERVICE}/ModelInfer": self._infer_step}
                                         if gw.tracing is None else {})
        self._wire = WireServer(
            unary, {f"/{_REFLECTION_SERVICE}/ServerReflectionInfo": reflect.answer},
            steps=steps, max_message=gw.settings.max_body_bytes,
            max_connections=max_connections)
        self.host = host
        self.port = port  # the bound one once started

    async def start(self) -> None:
        """Bind and start serving (``port`` is then the bound port)."""
        self.port = await self._wire.start(self.host, self.port)
        log.info("gRPC (Open Inference Protocol) on %s:%d", self.host, self.port)

    async def stop(self, grace_s: float) -> None:
        """Stop intake (newer calls refused), let running calls finish within ``grace_s``,
        then cancel them (``UNAVAILABLE``)."""
        await self._wire.stop(grace_s)

    # -- one call ------------------------------------------------------------------------------
    def _exchange(self, rpc: str, fn: _Handler) -> UnaryHandler:
        """``fn`` as a handler: request id in the log context, counted and timed by status,
        access-logged, a GatewayError answered with its status code. ``fn`` returns the reply,
        or an awaitable of it when it has to wait: the handler then returns a coroutine."""
        gw = self._gw
        traced = rpc == "ModelInfer"

        def handle(request: bytes, call: Call) -> Outcome | Coroutine[Any, Any, Outcome]:
            start = time.perf_counter()
            given = call.get("x-request-id")
            trace = None
            tracing = gw.tracing if traced else None
            if tracing is not None:
                parent = tracing.sample(call.get("traceparent"))
                if parent is not False:
                    trace = tracing.request(f"/{SERVICE}/{rpc}", parent, call.get("tracestate"),
                                            {"rpc.system": "grpc", "rpc.service": SERVICE,
                                             "rpc.method": rpc})
                    if given is None:
                        given = trace.trace_id.encode()
            rid = logs.request_id_from(given)
            token: Token[str] = logs.request_id.set(rid)
            if trace is not None:
                trace.enter()
            self._metrics.in_flight += 1
            try:
                reply = fn(request, call)
            except Exception as exc:
                return self._failed(rpc, start, rid, exc, trace, token)
            if type(reply) is bytes:
                return self._ended(rpc, start, rid, grpc.StatusCode.OK, "", reply, (), trace,
                                   token)
            return self._waited(rpc, start, rid, reply, trace, token)  # type: ignore[arg-type]

        return handle

    def _infer_step(self, calls: list[tuple[bytes, Call]]
                    ) -> list[Outcome | Coroutine[Any, Any, Outcome]]:
        """The ``ModelInfer`` calls that arrived together (tracing off), begun as one step of
        the pipeline, as the HTTP fast lane begins a step's requests: their new rows go to the
        model together. Per call, its outcome, or a coroutine of it when it has to wait."""
        gw = self._gw
        out: list[Outcome | Coroutine[Any, Any, Outcome] | None] = [None] * len(calls)
        started: list[tuple[int, float, str, Job]] = []
        for i, (request, call) in enumerate(calls):
            start = time.perf_counter()
            rid = logs.request_id_from(call.get("x-request-id"))
            self._metrics.in_flight += 1
            try:
                job = self._prepare(request, call)
            except Exception as exc:
                out[i] = self._failed("ModelInfer", start, rid, exc)
                continue
            started.append((i, start, rid, job))
        if started:
            begun: list[Answer | Pending | GatewayError | Exception]
            try:
                begun = list(gw.begin([(job.rt, job.rows, job.outputs)
                                       for _, _, _, job in started]))
            except Exception as exc:  # a fault of the gateway's own: every call still answered
                begun = [exc] * len(started)
            for (i, start, rid, job), result in zip(started, begun, strict=True):
                if isinstance(result, Answer):
                    try:
                        reply = self._encode(job, result)
                    except Exception as exc:
                        out[i] = self._failed("ModelInfer", start, rid, exc)
                    else:
                        out[i] = self._ended("ModelInfer", start, rid, grpc.StatusCode.OK, "",
                                             reply)
                elif isinstance(result, Exception):
                    out[i] = self._failed("ModelInfer", start, rid, result)
                else:
                    out[i] = self._waited("ModelInfer", start, rid, self._finish_infer(
                        job, gw.finish(result, job.timeout_s)))
        return out  # type: ignore[return-value]  # every position is filled above

    async def _waited(self, rpc: str, start: float, rid: str, reply: Awaitable[bytes],
                      trace: RequestTrace | None = None,
                      token: Token[str] | None = None) -> Outcome:
        """The outcome of a call that waits for ``reply`` (in a task of its own: the request
        id is set in its context)."""
        if token is None:
            token = logs.request_id.set(rid)
        try:
            got = await reply
        except Exception as exc:
            return self._failed(rpc, start, rid, exc, trace, token)
        except BaseException:  # cancelled: the peer left, or the deadline passed
            self._ended(rpc, start, rid, grpc.StatusCode.CANCELLED, "", None, (), trace, token)
            raise
        return self._ended(rpc, start, rid, grpc.StatusCode.OK, "", got, (), trace, token)

    def _failed(self, rpc: str, start: float, rid: str, exc: Exception,
                trace: RequestTrace | None = None, token: Token[str] | None = None) -> Outcome:
        """The outcome of a call that raised ``exc``: a GatewayError's status, else
        ``INTERNAL`` (the gateway's own fault, logged)."""
        if not isinstance(exc, GatewayError):
            log.error("%s failed", rpc, exc_info=exc)
            return self._ended(rpc, start, rid, grpc.StatusCode.INTERNAL, "internal error",
                               None, (), trace, token)
        self._gw.count_rejection(exc)
        code = status_code(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.error("%s failed: %s", rpc, exc.message)
        more = (("retry-after", exc.headers["Retry-After"]),) if "Retry-After" in exc.headers \
            else ()
        return self._ended(rpc, start, rid, code, exc.message, None, more, trace, token)

    def _ended(self, rpc: str, start: float, rid: str, code: grpc.StatusCode, message: str,
               reply: bytes | None, trailing: tuple[tuple[str, str], ...] = (),
               trace: RequestTrace | None = None, token: Token[str] | None = None) -> Outcome:
        """Count, time and log the call (its request id in the log context), end its trace,
        and say how it ended; ``token`` (the request id set by the caller) is reset."""
        if token is None:
            token = logs.request_id.set(rid)
        self._count(rpc, code, start, trace.trace_id if trace is not None else None)
        if trace is not None:
            trace.end(code in _SERVER_FAULTS, {"rpc.grpc.status_code": code.value[0]})
            trace.leave()
        logs.request_id.reset(token)
        return Outcome(code.value[0], message, reply, (("x-request-id", rid), *trailing))

    def _count(self, rpc: str, code: grpc.StatusCode, start: float,
               trace_id: str | None) -> None:
        metrics = self._metrics
        elapsed = time.perf_counter() - start
        counter = self._counters.get((rpc, code))
        if counter is None:
            counter = self._counters[(rpc, code)] = metrics.grpc_requests.labels(rpc, code.name)
        seconds = self._seconds.get(rpc)
        if seconds is None:
            seconds = self._seconds[rpc] = metrics.grpc_request_seconds.labels(rpc)
        metrics.tally.inc(counter)
        metrics.tally.observe(seconds, elapsed)
        metrics.in_flight -= 1
        if self._gw.settings.access_log == "on":
            logs.access("GRPC", f"/{SERVICE}/{rpc}", code.value[0], elapsed, trace_id=trace_id)

    # -- health and metadata -----------------------------------------------------------------
    def _health_check(self, request: bytes, call: Call) -> bytes:
        """``grpc.health.v1`` Check: SERVING while the gateway is ready (``""`` or the
        inference service), NOT_FOUND for another service."""
        req = _parse(health_pb2.HealthCheckRequest, request)
        if req.service not in ("", SERVICE):
            raise NotFound(f"unknown service {req.service!r:.80}", code="unknown_service")
        response = health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING if self._gw.ready
            else health_pb2.HealthCheckResponse.NOT_SERVING)
        return _serialized(response)

    def _server_live(self, request: bytes, call: Call) -> bytes:
        _parse(pb.ServerLiveRequest, request)
        return _serialized(pb.ServerLiveResponse(live=True))

    def _server_ready(self, request: bytes, call: Call) -> bytes:
        _parse(pb.ServerReadyRequest, request)
        return _serialized(pb.ServerReadyResponse(ready=self._gw.ready))

    def _model_ready(self, request: bytes, call: Call) -> bytes:
        req = _parse(pb.ModelReadyRequest, request)
        self._gw.runtime(req.name, req.version or None)
        return _serialized(pb.ModelReadyResponse(ready=self._gw.accepting))

    def _server_metadata(self, request: bytes, call: Call) -> bytes:
        _parse(pb.ServerMetadataRequest, request)
        return _serialized(pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION,
                                         extensions=["model_repository"]))

    def _model_metadata(self, request: bytes, call: Call) -> bytes:
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
    def _admin(self, call: Call) -> None:
        """Raises unless the call carries the admin token (``authorization: Bearer``
        metadata, compared in constant time): Forbidden without a token configured,
        Unauthorized when it is missing or wrong."""
        token = self._gw.settings.admin_token
        if token is None:
            raise Forbidden("the model repository API is disabled: set GATEWAY_ADMIN_TOKEN to "
                            "enable it")
        given = call.get("authorization") or b""
        scheme, _, value = given.partition(b" ")
        expected = token.get_secret_value().encode()
        if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), expected):
            raise Unauthorized("a valid 'authorization: Bearer <token>' metadata entry is "
                               "required")

    def _repository_index(self, request: bytes, call: Call) -> bytes:
        req = _parse(pb.RepositoryIndexRequest, request)
        self._admin(call)
        index = pb.RepositoryIndexResponse.ModelIndex
        return _serialized(pb.RepositoryIndexResponse(models=[
            index(**entry) for entry in self._gw.registry.index()
            if not req.ready or entry["state"] == "READY"]))

    async def _repository_load(self, request: bytes, call: Call) -> bytes:
        req = _parse(pb.RepositoryModelLoadRequest, request)
        await self._change(call, "load", req)
        return _serialized(pb.RepositoryModelLoadResponse())

    async def _repository_unload(self, request: bytes, call: Call) -> bytes:
        req = _parse(pb.RepositoryModelUnloadRequest, request)
        await self._change(call, "unload", req)
        return _serialized(pb.RepositoryModelUnloadResponse())

    async def _change(self, call: Call, op: str, req: Any) -> None:
        self._admin(call)
        unsupported = [k for k in req.parameters if k == "config" or k.startswith("file:")]
        if unsupported:
            raise _bad(f"repository {op}: parameter {unsupported[0]!r:.40} is not supported "
                       "(models come from the store as they are)")
        await self._gw.change_repository(op, req.model_name)

    # -- inference ---------------------------------------------------------------------------
    def _model_infer(self, request: bytes, call: Call) -> bytes | Awaitable[bytes]:
        """The reply, computed now when the pipeline answers without waiting."""
        gw = self._gw
        job = self._prepare(request, call)
        trace = current.get()
        if trace is not None:
            m = job.rt.manifest
            trace.note({"gateway.model": m.name, "gateway.model.version": str(m.version),
                        "gateway.rows": len(job.rows)})
        (begun,) = gw.begin([(job.rt, job.rows, job.outputs)],
                            None if gw.tracing is None else [trace])
        if isinstance(begun, GatewayError):
            raise begun
        if isinstance(begun, Answer):
            return self._encode(job, begun)
        return self._finish_infer(job, gw.finish(begun, job.timeout_s))

    async def _finish_infer(self, job: Job, answer: Awaitable[Answer]) -> bytes:
        return self._encode(job, await answer)

    def _prepare(self, request: bytes, call: Call) -> Job:
        """The request as a ``Job``; ``extra`` is (decoded request, output names, raw)."""
        gw = self._gw
        seen = self._decoded.find(request, len(request))
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
        remaining = call.time_remaining()
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


class _Reflection:
    """Server reflection (``grpc.reflection.v1alpha``) over ``services``, answered from the
    descriptor pool of our messages (a pool of their own, see the Makefile's ``proto``), with
    the health service's file added once: one reply per request message."""

    def __init__(self, services: tuple[str, ...]) -> None:
        name = health_pb2.DESCRIPTOR.name
        try:
            _POOL.FindFileByName(name)
        except KeyError:
            _POOL.AddSerializedFile(health_pb2.DESCRIPTOR.serialized_pb)
        self._servicer = reflection.ReflectionServicer(services, pool=_POOL)

    def answer(self, message: bytes) -> bytes:
        """The reply to one ``ServerReflectionRequest``. Raises ValueError when it is not
        one."""
        try:
            request = reflection_pb2.ServerReflectionRequest.FromString(message)
        except DecodeError as exc:
            raise ValueError(f"malformed ServerReflectionRequest message: {exc}") from None
        (reply,) = self._servicer.ServerReflectionInfo(iter((request,)), None)
        return _serialized(reply)
