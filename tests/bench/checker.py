"""Servers for the bench's own tests.

``CheckingServer`` answers 200 only to a well-formed request of the door it expects (the
features, the rows per request, finite numbers; V2 JSON or binary tensors of FP64 or FP32)
and records every row it was sent. ``SlowServer`` answers after a delay, in one of a few
framings, and records whether any connection ever carried two outstanding requests.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlparse

import numpy as np

_DTYPES = {"FP64": "<f8", "FP32": "<f4"}


@dataclass
class Expect:
    """What the checking server accepts, and what it saw."""

    door: str = "get"
    features: tuple[str, ...] = ()
    rows: int = 1
    model: str = "iris"
    requests: int = 0
    bad: list[str] = field(default_factory=list)
    seen: list[tuple[float, ...]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, rows: list[tuple[float, ...]] | None, why: str = "") -> bool:
        with self.lock:
            self.requests += 1
            if rows is None:
                self.bad.append(why)
                return False
            self.seen.extend(rows)
            return True


def _finite(rows: list[tuple[float, ...]]) -> bool:
    return all(math.isfinite(v) for r in rows for v in r)


def parse_request(expect: Expect, method: str, path: str, headers: Any, body: bytes
                  ) -> tuple[list[tuple[float, ...]] | None, str]:
    """The rows of one request if it is a well-formed request of ``expect.door``."""
    f = len(expect.features)
    url = urlparse(path)
    if expect.door == "get":
        if method != "GET" or url.path != "/predict":
            return None, f"{method} {url.path}"
        query = parse_qs(url.query)
        if sorted(query) != sorted(expect.features):
            return None, f"features {sorted(query)}"
        return [tuple(float(query[n][0]) for n in expect.features)], ""
    if method != "POST":
        return None, method
    if expect.door == "v1":
        if url.path != f"/v1/models/{expect.model}/predict":
            return None, url.path
        rows = [tuple(float(v) for v in r) for r in json.loads(body)["instances"]]
        if len(rows) != expect.rows or any(len(r) != f for r in rows):
            return None, "v1 shape"
        return rows, ""
    if url.path != f"/v2/models/{expect.model}/infer":
        return None, url.path
    length = headers.get("Inference-Header-Content-Length")
    if expect.door == "v2-bin":
        if length is None or headers.get("Content-Type") != "application/octet-stream":
            return None, "binary headers"
        head, tensor = json.loads(body[:int(length)]), body[int(length):]
    else:
        if length is not None or headers.get("Content-Type") != "application/json":
            return None, "json headers"
        head, tensor = json.loads(body), b""
    (inp,) = head["inputs"]
    if inp["shape"] != [expect.rows, f] or inp["datatype"] not in _DTYPES:
        return None, f"v2 shape {inp['shape']} {inp['datatype']}"
    if expect.door == "v2-bin":
        size = inp["parameters"]["binary_data_size"]
        if "data" in inp or size != len(tensor) or size != expect.rows * f * np.dtype(
                _DTYPES[inp["datatype"]]).itemsize:
            return None, "binary size"
        values = np.frombuffer(tensor, dtype=_DTYPES[inp["datatype"]]).astype(np.float64)
    else:
        values = np.asarray(inp["data"], dtype=np.float64)
        if values.shape != (expect.rows * f,):
            return None, "json data size"
        values = values.astype(_DTYPES[inp["datatype"]]).astype(np.float64)
    return [tuple(r) for r in values.reshape(expect.rows, f).tolist()], ""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    expect: ClassVar[Expect]

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            rows, why = parse_request(self.expect, self.command, self.path, self.headers, body)
        except (ValueError, KeyError, TypeError) as exc:
            rows, why = None, repr(exc)
        if rows is not None and not _finite(rows):
            rows, why = None, "not finite"
        ok = self.expect.record(rows, why)
        self.send_response(200 if ok else 400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_GET = do_POST = _handle

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def checking_server(expect: Expect) -> Iterator[str]:
    """A checking server for ``expect`` on a free loopback port; yields its URL."""
    handler = type("Handler", (_Handler,), {"expect": expect})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@dataclass
class SlowStats:
    connections: int = 0
    requests: int = 0
    shared: int = 0  # a request arrived on a connection whose previous one was unanswered


class _SlowProtocol(asyncio.Protocol):
    def __init__(self, server: SlowServer) -> None:
        self.server = server
        self.pending = 0
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.stats.connections += 1
        self.server.transports.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.transports.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            _, self.buf = self.buf.split(b"\r\n\r\n", 1)
            self.server.stats.requests += 1
            if self.pending:
                self.server.stats.shared += 1
            self.pending += 1
            asyncio.get_running_loop().call_later(self.server.delay_s, self._answer)

    def _answer(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.pending -= 1
        mode = self.server.mode
        if mode == "chunked":
            self.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"2\r\n{}\r\n0\r\n\r\n")
        elif mode == "close":
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                                 b"Connection: close\r\n\r\n{}")
            self.transport.close()
        elif mode == "500":
            self.transport.write(b"HTTP/1.1 500 Internal Server Error\r\n"
                                 b"content-length: 2\r\n\r\n{}")
        else:  # answer in two pieces, so the parser must wait for the body
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n{\"a\":")
            self.transport.write(b"\"bcde\"}")


class SlowServer:
    """Answers every request ``delay_s`` after it arrives (``mode``: ``ok``, ``chunked``,
    ``close``, ``500``), in a thread of its own."""

    def __init__(self, delay_s: float = 0.0, mode: str = "ok") -> None:
        self.delay_s = delay_s
        self.mode = mode
        self.stats = SlowStats()
        self.transports: set[Any] = set()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.url = ""

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(self._loop.create_server(
            lambda: _SlowProtocol(self), "127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        self._started.set()
        self._loop.run_forever()
        server.close()
        self._loop.run_until_complete(server.wait_closed())
        self._loop.close()

    def __enter__(self) -> SlowServer:
        self._thread.start()
        self._started.wait(10)
        return self

    def _stop(self) -> None:
        for t in list(self.transports):
            t.abort()
        self._loop.call_soon(self._loop.stop)

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop)
        self._thread.join(10)
