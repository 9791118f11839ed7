"""Helpers for the cross-replica coalescing tests: a burst fired over pre-opened connections,
a model that announces its calls and takes its time, and a Redis Cluster of the test's own."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from tests.support import free_port

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


class RedisCluster:
    """Three ``redis-server --cluster-enabled yes`` masters on free loopback ports, joined
    with ``redis-cli --cluster create``; each master can be killed."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.workdir = workdir
        self.ports = [_cluster_port() for _ in range(masters)]
        self.procs: list[subprocess.Popen[str]] = []

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def start(self) -> None:
        for port in self.ports:
            d = self.workdir / str(port)
            d.mkdir()
            proc = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(d), "--cluster-enabled", "yes",
                 "--cluster-config-file", str(d / "nodes.conf"), "--cluster-node-timeout",
                 "1000", "--cluster-require-full-coverage", "no", "--loglevel", "notice"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            self.procs.append(proc)
            _wait_line(proc, "Ready to accept connections")
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, text=True, timeout=30)
        for port in self.ports:  # every node agrees the cluster is up
            _wait_cluster_ok(port)

    def kill(self, i: int) -> None:
        self.procs[i].kill()
        self.procs[i].wait()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def _cluster_port() -> int:
    """A free port below 55536 whose cluster bus port (+10000) is free too."""
    for _ in range(200):
        port = free_port()
        if port > 55535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def _wait_line(proc: subprocess.Popen[str], text: str) -> None:
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            threading.Thread(target=_discard, args=(proc.stdout,), daemon=True).start()
            return
    raise RuntimeError("redis-server did not start:\n" + "".join(lines))


def _discard(stream: Any) -> None:
    try:
        for _ in stream:
            pass
    except ValueError:  # closed at exit
        pass


def _wait_cluster_ok(port: int) -> None:
    """Block until the node reports ``cluster_state:ok`` (``redis-cli`` waits on the node)."""
    for _ in range(1000):
        out = subprocess.run(["redis-cli", "-p", str(port), "cluster", "info"],
                             capture_output=True, text=True, timeout=10).stdout
        if "cluster_state:ok" in out:
            return
    raise RuntimeError(f"cluster node {port} never reported cluster_state:ok")


@contextmanager
def redis_cluster(workdir: Path) -> Iterator[RedisCluster]:
    cluster = RedisCluster(workdir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
