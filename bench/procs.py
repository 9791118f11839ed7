"""Processes the bench starts and stops itself: redis-server, gateways, the ceiling app.

Each runs on a free loopback port, is waited for by a readiness probe (PING, ``/readyz``) and
is stopped by its own PID when its context ends.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import httpx

__all__ = ["Service", "free_port", "gateway", "redis_server", "uvicorn_app"]


@dataclass
class Service:
    """One started process: its URL, and how to restart it and wait until it is ready."""

    url: str
    command: list[str]
    env: dict[str, str]
    probe: Callable[[], bool]
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        self.proc = subprocess.Popen(self.command, env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while not self.probe():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.command[0]} exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.url} not ready after {timeout_s:.0f} s")
            time.sleep(0.05)  # readiness polling of a child process (bench code, not tests)

    def kill(self) -> None:
        """SIGKILL: the abrupt loss the redis-down scenario simulates."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis_ping(port: int) -> Callable[[], bool]:
    def ping() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    return ping


def _http_ready(url: str) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    return ready


@contextmanager
def _running(svc: Service) -> Iterator[Service]:
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()


def redis_server() -> AbstractContextManager[Service]:
    """A throw-away ``redis-server`` (no persistence) on a free port."""
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(exe):
        raise RuntimeError("redis-server not found (apt-get install redis-server)")
    port = free_port()
    cmd = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    return _running(Service(f"redis://127.0.0.1:{port}/0", cmd, dict(os.environ),
                            _redis_ping(port)))


def gateway(env: Mapping[str, str], *, workers: int = 1) -> AbstractContextManager[Service]:
    """``python -m gateway`` on a free port with ``GATEWAY_*`` settings from ``env``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "gateway", "--port", str(port), "--workers", str(workers),
           "--log-level", "warning"]
    return _running(Service(url, cmd, {**os.environ, **env}, _http_ready(url)))


def uvicorn_app(app: str) -> AbstractContextManager[Service]:
    """Any ASGI app by import string (the ceiling), served by uvicorn like the gateway."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "uvicorn", app, "--port", str(port), "--loop", "uvloop",
           "--http", "httptools", "--log-level", "warning", "--no-access-log"]
    return _running(Service(url, cmd, dict(os.environ), _http_ready(url)))
