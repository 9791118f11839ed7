"""Real processes for the hardening tests: gateways (``python -m gateway``), a restartable
redis-server of the test's own, and a TCP proxy that adds one-way latency.

Every wait is on a process's own readiness line, never a timed sleep; every process is stopped
by its PID.
"""

from __future__ import annotations

import asyncio
import os
import re
import resource
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from tests.support import free_port

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``, in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or m["name"] != name:
            continue
        have = dict(_LABEL.findall(m["labels"] or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m["value"])
    return total


def metric_total(gateways: list[GatewayProcess], name: str, **labels: str) -> float:
    """``metric`` summed over the ``/metrics`` of every gateway."""
    return sum(metric(gw.metrics(), name, **labels) for gw in gateways)


@dataclass
class GatewayProcess:
    """A running ``python -m gateway``; ``log`` fills with its stderr lines."""

    proc: subprocess.Popen[str]
    base: str
    port: int
    log: list[str] = field(default_factory=list)

    def metrics(self) -> str:
        return httpx.get(f"{self.base}/metrics", timeout=10).text

    def l2_hits(self) -> float:
        return metric(self.metrics(), "gateway_cache_lookups_total", tier="l2", result="hit")

    def terminate(self, timeout_s: float = 30) -> int:
        """SIGTERM; the exit status (negative: killed by that signal)."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)


def _limit_open_files(n: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
    return apply


@contextmanager
def gateway_process(
    env: dict[str, str],
    *,
    workers: int = 1,
    open_files: int | None = None,
    args: tuple[str, ...] = (),
) -> Iterator[GatewayProcess]:
    """``python -m gateway`` on a free port with ``GATEWAY_*`` from ``env`` (and an open-file
    limit, if given), yielded once each worker has logged its startup; stopped at the end."""
    port = free_port()
    cmd = [sys.executable, "-m", "gateway", "--port", str(port), "--workers", str(workers),
           "--log-level", "info", *args]
    proc = subprocess.Popen(
        cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, preexec_fn=_limit_open_files(open_files) if open_files else None,
    )
    gw = GatewayProcess(proc, f"http://127.0.0.1:{port}", port)
    assert proc.stderr is not None
    drain = threading.Thread(target=_collect, args=(proc.stderr, gw.log), daemon=True)
    try:
        started, listening = 0, False
        for line in proc.stderr:  # startup is logged before the socket is bound, hence both
            gw.log.append(line)
            started += "Application startup complete" in line
            listening = listening or "Uvicorn running on" in line
            if started == workers and listening:
                break
        else:
            raise RuntimeError("gateway exited during startup:\n" + "".join(gw.log))
        drain.start()
        yield gw
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _close(proc, drain)


def _close(proc: subprocess.Popen[str], drain: threading.Thread | None) -> None:
    """After the process has exited: let the reader reach end of file, then close the pipes."""
    if drain is not None and drain.is_alive():
        drain.join(timeout=10)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _collect(stream: IO[str], log: list[str]) -> None:
    with suppress(ValueError):  # closed at exit
        for line in stream:
            log.append(line)


class RedisServer:
    """A redis-server of the test's own on a free loopback port (no persistence), that can be
    killed, stopped and started again on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[str] | None = None
        self._drain: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start and wait for its "Ready to accept connections" line."""
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--loglevel", "notice"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        assert self.proc.stdout is not None
        lines: list[str] = []
        for line in self.proc.stdout:
            lines.append(line)
            if "Ready to accept connections" in line:
                break
        else:
            raise RuntimeError("redis-server did not start:\n" + "".join(lines))
        self._drain = threading.Thread(target=_collect, args=(self.proc.stdout, []), daemon=True)
        self._drain.start()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL and reap."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        _close(self.proc, self._drain)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped server cannot act on SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            _close(self.proc, self._drain)


@contextmanager
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class DelayProxy:
    """A TCP proxy on a free loopback port that delivers every chunk ``delay_s`` after it was
    read, in each direction (so a round trip costs ``2 * delay_s`` more), in order. Runs its
    own event loop in a thread; ``delay_s`` may be changed while it runs."""

    def __init__(self, target_port: int, delay_s: float = 0.0) -> None:
        self.target_port = target_port
        self.delay_s = delay_s
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.Server | None = None
        self._stop: asyncio.Event | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self.accepted = 0  # connections accepted so far

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> DelayProxy:
        self._thread.start()
        self._ready.wait(10)
        assert self._server is not None, "proxy did not start"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self._ready.set()
        async with self._server:
            await self._stop.wait()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        self.accepted += 1
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1",
                                                                     self.target_port)
            except OSError:
                writer.close()
                return
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer),
                                 return_exceptions=True)
        finally:
            self._conns.discard(task)
            writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            try:
                while True:
                    due, data = await chunks.get()
                    late = due - loop.time()
                    if late > 0:
                        await asyncio.sleep(late)  # the latency being simulated
                    if not data:
                        return
                    writer.write(data)
                    await writer.drain()
            finally:
                writer.close()

        delivery = loop.create_task(deliver())
        try:
            while data := await reader.read(65536):
                chunks.put_nowait((loop.time() + self.delay_s, data))
        except OSError:
            pass
        finally:
            chunks.put_nowait((loop.time() + self.delay_s, b""))
            with suppress(OSError):
                await delivery
