"""Helpers for the cross-replica coalescing tests: a burst fired over pre-opened connections,
and a model that announces its calls and takes its time (the Redis Cluster is in
``bench.procs``)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

SLEEP_ENV = "REMOTE_TEST_SLEEP_S"
NOTIFY_ENV = "REMOTE_TEST_NOTIFY"


class Sleepy:
    """An estimator wrapper whose calls, in a process with ``REMOTE_TEST_SLEEP_S`` set, first
    send the process id to the unix socket ``REMOTE_TEST_NOTIFY`` and then take that long.
    Elsewhere (registration, verification) it is the wrapped estimator."""

    def __init__(self, estimator: Any) -> None:
        self.estimator = estimator
        self.classes_ = estimator.classes_
        self.n_features_in_ = estimator.n_features_in_

    def _enter(self) -> None:
        seconds = os.environ.get(SLEEP_ENV)
        if seconds is None:
            return
        path = os.environ.get(NOTIFY_ENV)
        if path:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
                s.sendall(f"{os.getpid()}\n".encode())
        time.sleep(float(seconds))  # the model's own duration (runs in its worker thread)

    def predict(self, x: np.ndarray) -> np.ndarray:
        self._enter()
        return self.estimator.predict(x)  # type: ignore[no-any-return]

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        self._enter()
        return self.estimator.predict_proba(x)  # type: ignore[no-any-return]


def predict_request(port: int, row: list[float]) -> tuple[int, bytes]:
    """A raw HTTP/1.1 ``POST /v1/models/iris/predict`` of one row, closing the connection."""
    body = orjson.dumps({"instances": [row]})
    head = (f"POST /v1/models/iris/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    return port, head + body


@dataclass
class Reply:
    status: int  # 0: no HTTP answer (connection failed or closed)
    body: bytes

    def prediction(self) -> Any:
        return orjson.loads(self.body)["predictions"][0]


async def fire(requests: list[tuple[int, bytes]]) -> list[Reply]:
    """Open one connection per request first, then write every request in one pass (so they
    all leave within a few milliseconds), then read the answers, in order."""
    conns = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port)
                                   for port, _ in requests))
    for (_, writer), (_, raw) in zip(conns, requests, strict=True):
        writer.write(raw)

    async def read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Reply:
        try:
            data = await reader.read()
        except OSError:
            data = b""
        finally:
            writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        parts = head.split(b" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        return Reply(status, body)

    return list(await asyncio.gather(*(read(r, w) for r, w in conns)))
