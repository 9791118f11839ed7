"""Logging: text or JSON lines, request ids, and the access log.

Every request has an id: ``X-Request-Id`` when the client (or nginx) sent a usable one (at most
128 characters of ``A-Z a-z 0-9 . _ : -``), else one made here. It is echoed in the response
and carried by every log line written while the request is answered (a context variable read
by ``RequestIdFilter``). Every line names its process (a worker, or the supervisor of
``--workers N``). With ``GATEWAY_LOG_FORMAT=json`` each line is one JSON object with
``time``, ``level``, ``logger``, ``pid``, ``message``, ``request_id`` and, for access lines,
``method``, ``path``, ``status``, ``duration_ms``, ``cache``, ``model``, ``version``, and
``trace_id`` for a request with a trace (``GATEWAY_TRACING``). The access log
(``GATEWAY_ACCESS_LOG=on``) is off by default: it costs a log record per request.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import os
import re
import sys
import time
from typing import Any, Literal

import orjson

__all__ = [
    "ACCESS",
    "JsonFormatter",
    "RequestIdFilter",
    "access",
    "configure",
    "new_request_id",
    "request_id",
    "request_id_from",
]

ACCESS = logging.getLogger("gateway.access")

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

_VALID_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
_PREFIX = os.urandom(4).hex()
_COUNTER = itertools.count(1)
_ACCESS_FIELDS = ("method", "path", "status", "duration_ms", "cache", "model", "version",
                  "trace_id")


def new_request_id() -> str:
    """A process-unique id: a random prefix per process and a counter."""
    return f"{_PREFIX}-{next(_COUNTER):x}"


def request_id_from(header: bytes | None) -> str:
    """The client's ``X-Request-Id`` if it is usable, else a new id."""
    if header is not None and _VALID_ID.fullmatch(header):
        return header.decode("ascii")
    return new_request_id()


def access(method: str, path: str, status: int, seconds: float, *, cache: str | None = None,
           model: str | None = None, version: str | None = None,
           trace_id: str | None = None) -> None:
    """One access-log line (call only when the access log is on); ``trace_id``: the
    request's trace, when it has one."""
    fmt = "%s %s %d %.2fms" if trace_id is None else "%s %s %d %.2fms trace_id=" + trace_id
    ACCESS.info(fmt, method, path, status, seconds * 1e3, extra={
        "method": method, "path": path, "status": status,
        "duration_ms": round(seconds * 1e3, 3), "cache": cache, "model": model,
        "version": version, "trace_id": trace_id})


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` to every record (``-`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        for name in _ACCESS_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


def configure(fmt: Literal["text", "json"], level: str = "INFO") -> None:
    """Route every logger (uvicorn's included) through one handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s [%(process)d %(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    # uvicorn writes access lines whenever its access logger has a handler, its ancestors' too:
    # the gateway writes its own (GATEWAY_ACCESS_LOG), so uvicorn's reach none.
    uvicorn_access = logging.getLogger("uvicorn.access")
    uvicorn_access.handlers[:] = []
    uvicorn_access.propagate = False
