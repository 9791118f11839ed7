"""Python load for what wrk cannot do: an identical burst, and open-loop (fixed-rate) load."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import numpy as np

__all__ = ["BurstResult", "OpenLoopResult", "burst", "open_loop", "unique_row"]

def unique_row(salt: int, n: int, features: Sequence[str]) -> dict[str, str]:
    """A row never produced for another ``(salt, n)``; same shape as the wrk scripts' rows."""
    k = salt * 10_000_000 + n
    row = {features[0]: f"{4 + (n % 40) / 10 + k * 1e-12:.12f}"}
    for j, name in enumerate(features[1:], start=2):
        row[name] = f"{((n * (2 * j - 1)) % 60) / 10:.1f}"
    return row


@dataclass(frozen=True, slots=True)
class BurstResult:
    requests: int
    errors: int
    seconds: float
    distinct_answers: int


async def _burst(url: str, n: int, params: dict[str, str]) -> BurstResult:
    """Open ``n`` connections, then write the same request on all of them back to back (no
    await in between), so the server sees them as one burst; a Python HTTP client would
    stagger them by its own per-request cost."""
    parsed = httpx.URL(url)
    host, port = parsed.host, parsed.port or 80
    query = "&".join(f"{k}={v}" for k, v in params.items())
    request = (f"GET /predict?{query} HTTP/1.1\r\nHost: {host}:{port}\r\n"
               "Connection: close\r\n\r\n").encode()
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
    """Fire ``n`` identical requests for one new row at once."""
    return asyncio.run(_burst(url, n, unique_row(salt, 0, features)))


@dataclass(frozen=True, slots=True)
class OpenLoopResult:
    rate: float
    sent: int
    errors: int
    latency_us: dict[float, int]


async def _open_loop(url: str, rate: float, duration_s: float, salt: int,
                     percentiles: tuple[float, ...], features: Sequence[str]
                     ) -> OpenLoopResult:
    total = max(1, int(rate * duration_s))
    latencies = np.zeros(total)
    errors = 0
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10) as client:

        async def one(i: int, due: float) -> None:
            nonlocal errors
            try:
                r = await client.get("/predict", params=unique_row(salt, i, features))
                if r.status_code != 200:
                    errors += 1
            except httpx.HTTPError:
                errors += 1
            # Measured from when the request was due, not when it went out: a late sender
            # does not hide queueing (no coordinated omission).
            latencies[i] = time.perf_counter() - due

        start = time.perf_counter()
        tasks = []
        for i in range(total):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # the arrival schedule itself
            tasks.append(asyncio.create_task(one(i, due)))
        await asyncio.gather(*tasks)
    lat = {p: int(np.percentile(latencies, p) * 1e6) for p in percentiles}
    return OpenLoopResult(rate, total, errors, lat)


def open_loop(url: str, rate: float, duration_s: float, salt: int,
              percentiles: tuple[float, ...], features: Sequence[str]) -> OpenLoopResult:
    """Unique rows at a fixed arrival ``rate`` (requests/s) for ``duration_s``."""
    return asyncio.run(_open_loop(url, rate, duration_s, salt, percentiles, features))
