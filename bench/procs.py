"""The processes the bench and the tests start: gateways (``python -m gateway``), any ASGI app
under uvicorn, MLServer, a restartable redis-server and a Redis Cluster, each on a free loopback
port.

Every process is waited for on its own output (uvicorn's startup and listening lines,
redis-server's "Ready to accept connections"), never by sleeping or polling, and is signalled
and reaped by its own PID when its context ends.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "GatewayProcess", "Process", "RedisCluster", "RedisServer", "free_port", "gateway_process",
    "gateways", "measured_run", "mlserver_process", "redis_cluster", "redis_server",
    "uvicorn_app",
]

_STARTED = "Application startup complete"  # one per worker, once its lifespan has started
_LISTENING = "Uvicorn running on"  # one process: logged once bound, after its startup
_REDIS_READY = "Ready to accept connections"
_MLSERVER_LOADED = "Loaded model '{}' successfully"  # MLServer 1.7: once in the inference
# worker, then once in the main process when the model is ready there


PORTS_ENV = "BENCH_PORTS"  # e.g. 20000-20999: where free_port picks (default: the kernel)


def measured_run(argv: Sequence[str], *, stdout: IO[bytes], stderr: IO[bytes] | int,
                 kill_after_s: float, preexec_fn: Callable[[], None] | None = None
                 ) -> tuple[int, resource.struct_rusage]:
    """Run a load generator to its end (killed past ``kill_after_s``): its exit code and its
    own rusage (reaped here with ``os.wait4``, so its CPU is the child's alone)."""
    proc = subprocess.Popen(list(argv), stdout=stdout, stderr=stderr, preexec_fn=preexec_fn)
    guard = threading.Timer(kill_after_s, proc.kill)
    guard.start()
    try:
        _pid, status, usage = os.wait4(proc.pid, 0)
    finally:
        guard.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage


def free_port() -> int:
    """A loopback TCP port nothing listens on now: the kernel's pick, or one of the range
    ``$BENCH_PORTS`` (``LOW-HIGH``, inclusive) for a machine where only those may be used.

    Raises ValueError for a malformed range, OSError when no port of it is free.
    """
    span = os.environ.get(PORTS_ENV)
    if not span:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    low, sep, high = span.partition("-")
    if not (sep and low.isdigit() and high.isdigit() and 0 < int(low) <= int(high) < 65536):
        raise ValueError(f"{PORTS_ENV}={span!r}: expected LOW-HIGH, e.g. 20000-20999")
    ports = list(range(int(low), int(high) + 1))
    start = random.randrange(len(ports))  # concurrent pickers rarely collide
    for port in ports[start:] + ports[:start]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError(f"{PORTS_ENV}={span}: no free port in the range")


class Process:
    """A child process whose output lines are collected as they come.

    Its stderr is collected, or stdout and stderr together when ``stdout`` is
    ``subprocess.STDOUT``. ``wait_for`` blocks on those lines (a condition variable, bounded by
    a timeout), never on sleeping; ``stop`` signals the process by its PID and reaps it.
    """

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                 stdout: IO[Any] | int = subprocess.DEVNULL,
                 open_files: int | None = None) -> None:
        self.argv = list(argv)
        merged = stdout == subprocess.STDOUT
        self.popen = subprocess.Popen(
            self.argv, env=env, text=True,
            stdout=subprocess.PIPE if merged else stdout,
            stderr=subprocess.STDOUT if merged else subprocess.PIPE,
            preexec_fn=_limit_open_files(open_files) if open_files else None)
        stream = self.popen.stdout if merged else self.popen.stderr
        assert stream is not None
        self._stream = stream
        self._lines: list[str] = []  # appended by the reader only; guarded by _cond
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def lines(self) -> list[str]:
        """The lines so far (a live list); every line once the process has ended."""
        if self.popen.poll() is not None:
            self._reader.join(timeout=5)  # let the reader reach end of file
        return self._lines

    def _read(self) -> None:
        for line in self._stream:  # closed by ``wait`` only once this loop has ended
            with self._cond:
                self._lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def matches(self, pattern: str | re.Pattern[str]) -> list[re.Match[str]]:
        with self._cond:
            lines = list(self._lines)
        return [m for line in lines if (m := re.search(pattern, line))]

    def wait_for(self, pattern: str | re.Pattern[str], *, count: int = 1,
                 timeout_s: float = 60) -> list[re.Match[str]]:
        """The first ``count`` output matches of ``pattern``, once there are that many.

        Raises RuntimeError (with the output so far) if the process ends or ``timeout_s``
        passes first.
        """
        with self._cond:
            self._cond.wait_for(
                lambda: self._eof or sum(bool(re.search(pattern, x)) for x in self._lines) >= count,
                timeout=timeout_s)
        found = self.matches(pattern)
        if len(found) < count:
            raise RuntimeError(f"{self.argv[0]}: no {pattern!r} x{count} "
                               f"(exit code {self.popen.poll()}):\n{self.output()[-4000:]}")
        return found[:count]

    def output(self) -> str:
        lines = self.lines
        with self._cond:
            return "".join(lines)

    def send(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20) -> int:
        """Send ``sig`` (if still running), then ``wait``."""
        self.send(sig)
        return self.wait(timeout_s)

    def wait(self, timeout_s: float = 20) -> int:
        """The exit code, once the process has ended; SIGKILL after ``timeout_s``."""
        try:
            self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        self._reader.join(timeout=5)
        if not self._reader.is_alive():
            self._stream.close()
        return self.popen.returncode


def _limit_open_files(n: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
    return apply


def _executable(name: str) -> str:
    exe = shutil.which(name) or next(
        (p for p in (f"/usr/bin/{name}", f"/usr/local/bin/{name}") if os.access(p, os.X_OK)),
        None)
    if exe is None:
        raise RuntimeError(f"{name} not found: install it (apt-get install redis-server)")
    return exe


# -- uvicorn servers --------------------------------------------------------------------------

@dataclass
class GatewayProcess:
    """A running uvicorn server (``python -m gateway``, or an app by ``uvicorn_app``): where it
    listens (a loopback port, or the unix socket ``uds``) and its process."""

    process: Process
    port: int | None
    uds: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}" if self.port else "http://gateway"

    @property
    def base(self) -> str:
        """``url`` (the tests' name for it)."""
        return self.url

    @property
    def proc(self) -> subprocess.Popen[str]:
        return self.process.popen

    @property
    def log(self) -> list[str]:
        """Its stderr lines so far (all of them once it has ended)."""
        return self.process.lines

    @property
    def upstream(self) -> str:
        """The address as an nginx ``server`` line names it."""
        return f"unix:{self.uds}" if self.uds else f"127.0.0.1:{self.port}"

    def client(self, **kwargs: Any) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=str(self.uds)) if self.uds else None
        return httpx.Client(base_url=self.url, transport=transport, **kwargs)

    def metrics(self) -> str:
        """Its ``/metrics`` text."""
        with self.client(timeout=10) as client:
            return client.get("/metrics").text

    def l2_hits(self) -> float:
        """Rows answered from Redis so far:
        ``gateway_cache_lookups_total{tier="l2",result="hit"}``."""
        return sum(s.value for family in text_string_to_metric_families(self.metrics())
                   for s in family.samples
                   if s.name == "gateway_cache_lookups_total"
                   and s.labels.get("tier") == "l2" and s.labels.get("result") == "hit")

    def terminate(self, timeout_s: float = 30) -> int:
        """SIGTERM; the exit status (negative: killed by that signal; SIGKILL after
        ``timeout_s``)."""
        return self.process.stop(signal.SIGTERM, timeout_s)


_PORT_TRIES = 3
_IN_USE = "Address already in use"  # a gateway's own message when its port was taken


@contextmanager
def _serving(argvs: Sequence[tuple[list[str], int | None]], env: Mapping[str, str], *,
             uds: Path | None = None, workers: int = 1,
             open_files: int | None = None) -> Iterator[list[GatewayProcess]]:
    """Start each uvicorn command line (with its port) together; yield them once each worker has
    logged that its startup is complete and the socket is listening; SIGTERM them at the end."""
    started: list[GatewayProcess] = []
    try:
        for argv, port in argvs:
            process = Process(argv, env={**os.environ, **env}, open_files=open_files)
            started.append(GatewayProcess(process, port, uds))
        for gw in started:
            gw.process.wait_for(_STARTED, count=workers)
            gw.process.wait_for(_LISTENING)  # with workers, the supervisor binds first
        yield started
    finally:
        for gw in started:
            gw.process.send(signal.SIGTERM)
        for gw in started:
            gw.process.wait(timeout_s=30)


@contextmanager
def gateways(count: int, env: Mapping[str, str], *, uds: Path | None = None, workers: int = 1,
             args: Sequence[str] = (),
             open_files: int | None = None) -> Iterator[list[GatewayProcess]]:
    """``count`` processes of ``python -m gateway`` with ``GATEWAY_*`` settings from ``env``,
    each on a free port (or the one on ``uds``) and with an open-file limit if given, started
    together; yielded once each is serving, stopped with SIGTERM when the context ends. A port
    taken between its pick and the bind (by another process's outgoing connection: the kernel
    picks both from one range) is picked again, up to ``_PORT_TRIES`` times in all."""
    if uds is not None and count != 1:
        raise ValueError("one gateway per unix socket")
    with ExitStack() as stack:
        for attempt in range(1, _PORT_TRIES + 1):
            argvs = []
            for _ in range(count):
                port = None if uds else free_port()
                where = ["--uds", str(uds)] if uds else ["--port", str(port)]
                argvs.append(([sys.executable, "-m", "gateway", *where, "--workers",
                               str(workers), "--log-level", "info", *args], port))
            try:
                started = stack.enter_context(
                    _serving(argvs, env, uds=uds, workers=workers, open_files=open_files))
                break
            except RuntimeError as exc:
                if uds is not None or attempt == _PORT_TRIES or _IN_USE not in str(exc):
                    raise
        yield started


@contextmanager
def gateway_process(env: Mapping[str, str], *, uds: Path | None = None, workers: int = 1,
                    args: Sequence[str] = (),
                    open_files: int | None = None) -> Iterator[GatewayProcess]:
    """One gateway, as ``gateways(1, env, ...)``."""
    with gateways(1, env, uds=uds, workers=workers, args=args, open_files=open_files) as (gw,):
        yield gw


@contextmanager
def uvicorn_app(app: str) -> Iterator[GatewayProcess]:
    """Any ASGI app by import string (the ceiling) on a free port, served by uvicorn like the
    gateway (uvloop, httptools, no access log)."""
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", app, "--port", str(port), "--loop", "uvloop",
            "--http", "httptools", "--log-level", "info", "--no-access-log"]
    with _serving([(argv, port)], {}) as (server,):
        yield server


@contextmanager
def mlserver_process(executable: Path, repository: Path, models: Sequence[str], *,
                     timeout_s: float = 120) -> Iterator[GatewayProcess]:
    """``mlserver start`` on the model directories in ``repository`` (its ``settings.json`` is
    written here: loopback only, free HTTP, gRPC and metrics ports, no access log, one parallel
    inference worker); yielded once its HTTP server listens and it has logged each of
    ``models`` loaded; SIGTERM at the end."""
    port = free_port()
    (repository / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": port, "grpc_port": free_port(),
        "metrics_port": free_port(), "debug": False, "parallel_workers": 1,
        "metrics_dir": str(repository / ".metrics"),
        "environments_dir": str(repository / ".envs"),
    }))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = Process([str(executable), "start", str(repository)], env=env,
                      stdout=subprocess.STDOUT)
    try:
        process.wait_for(f"{_LISTENING} http://127.0.0.1:{port}", timeout_s=timeout_s)
        for name in models:
            process.wait_for(re.escape(_MLSERVER_LOADED.format(name)), count=2,
                             timeout_s=timeout_s)
        yield GatewayProcess(process, port)
    finally:
        process.stop(signal.SIGTERM, timeout_s=30)


# -- redis-server -----------------------------------------------------------------------------

class RedisServer:
    """A redis-server on a free loopback port and a unix socket in ``workdir``, without
    persistence, that can be signalled (SIGSTOP: a hung server), killed, stopped and started
    again on the same port."""

    host = "127.0.0.1"

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.unixsocket = workdir / "redis.sock"
        self.process: Process | None = None  # the last one started

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> None:
        """Start and wait for its "Ready to accept connections" line."""
        self.process = Process(
            [_executable("redis-server"), "--port", str(self.port), "--bind", self.host,
             "--unixsocket", str(self.unixsocket), "--unixsocketperm", "700", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--loglevel", "notice"],
            stdout=subprocess.STDOUT)
        try:
            self.process.wait_for(_REDIS_READY, timeout_s=30)
        except RuntimeError:
            self.process.stop(signal.SIGKILL)
            raise

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send(sig)

    def kill(self) -> None:
        """SIGKILL (the abrupt loss of Redis) and reap."""
        if self.process is not None:
            self.process.stop(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM and reap (SIGKILL after 10 s); a stopped (SIGSTOP) server is resumed first."""
        if self.process is not None:
            self.process.send(signal.SIGCONT)  # a stopped server cannot act on SIGTERM
            self.process.stop(signal.SIGTERM, timeout_s=10)


@contextmanager
def redis_server(workdir: Path | None = None) -> Iterator[RedisServer]:
    """A started ``RedisServer`` in ``workdir`` (default: a temporary directory of its own),
    stopped when the context ends."""
    with ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="redis-")))
        server = RedisServer(workdir)
        server.start()
        try:
            yield server
        finally:
            server.stop()


class RedisCluster:
    """``masters`` redis-server nodes in cluster mode (no replicas) on free loopback ports,
    joined by ``redis-cli --cluster create``; each node can be killed."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.workdir = workdir
        self.ports = [_cluster_port() for _ in range(masters)]
        self.nodes: list[Process] = []

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def start(self) -> None:
        """Start every node, join them, and wait until each has logged that the cluster is
        up ("Cluster state changed: ok")."""
        exe = _executable("redis-server")
        for port in self.ports:
            d = self.workdir / str(port)
            d.mkdir()
            self.nodes.append(Process(
                [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(d), "--cluster-enabled", "yes",
                 "--cluster-config-file", str(d / "nodes.conf"), "--cluster-node-timeout",
                 "1000", "--cluster-require-full-coverage", "no", "--loglevel", "notice"],
                stdout=subprocess.STDOUT))
        for node in self.nodes:
            node.wait_for(_REDIS_READY, timeout_s=30)
        subprocess.run(
            [_executable("redis-cli"), "--cluster", "create",
             *(f"127.0.0.1:{p}" for p in self.ports), "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, text=True, timeout=30)
        for node in self.nodes:
            node.wait_for("Cluster state changed: ok", timeout_s=30)

    def kill(self, i: int) -> None:
        """SIGKILL node ``i`` and reap it."""
        self.nodes[i].stop(signal.SIGKILL)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop(signal.SIGTERM, timeout_s=10)


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


@contextmanager
def redis_cluster(workdir: Path, masters: int = 3) -> Iterator[RedisCluster]:
    """A started ``RedisCluster`` with its nodes' directories in ``workdir``, stopped at the
    end."""
    cluster = RedisCluster(workdir, masters)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
