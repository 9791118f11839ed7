"""Python load for what wrk and the fixed-rate generator do not do: an identical burst, and a
one-request probe of a door."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from bench.doors import Load, build

__all__ = ["BurstResult", "burst", "probe"]

_CLOSE = (("Connection", "close"),)


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


@dataclass(frozen=True, slots=True)
class BurstResult:
    requests: int
    errors: int
    seconds: float
    distinct_answers: int


async def _burst(url: str, n: int, request: bytes) -> BurstResult:
    """Open ``n`` connections, then write the same request on all of them back to back (no
    await in between), so the server sees them as one burst; a Python HTTP client would
    stagger them by its own per-request cost."""
    host, port = _host_port(url)
    conns = await asyncio.gather(*(asyncio.open_connection(host, port) for _ in range(n)))
    start = time.perf_counter()
    for _, writer in conns:
        writer.write(request)
    bodies = await asyncio.gather(*(_read_response(r) for r, _ in conns),
                                  return_exceptions=True)
    seconds = time.perf_counter() - start
    for _, writer in conns:
        writer.close()
    ok = [b for b in bodies if isinstance(b, tuple) and b[0] == 200]
    return BurstResult(n, n - len(ok), seconds, len({b[1] for b in ok}))


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


def burst(url: str, n: int, salt: int, features: Sequence[str]) -> BurstResult:
    """Fire ``n`` identical requests (``GET /predict``) for one new row at once."""
    host, port = _host_port(url)
    load = Load("get", "unique", tuple(features), salt=salt, extra_headers=_CLOSE)
    (request,) = build(load, 1, f"{host}:{port}")
    return asyncio.run(_burst(url, n, request))


def probe(url: str, load: Load, timeout_s: float = 10.0) -> int:
    """The HTTP status one request of ``load`` gets (0 when nothing answers)."""
    host, port = _host_port(url)
    (request,) = build(replace(load, extra_headers=_CLOSE), 1, f"{host}:{port}")
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.sendall(request)
            head = b""
            while b"\r\n" not in head:
                chunk = s.recv(4096)
                if not chunk:
                    return 0
                head += chunk
    except OSError:
        return 0
    try:
        return int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0
