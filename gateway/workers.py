"""Several uvicorn workers on one socket, with metrics that are the server's.

``metrics_dir(parent)`` gives one server a directory of its own for prometheus-client's
multiprocess files (see ``gateway.metrics``): created at start, removed at exit, and held by a
lock while the server runs, so that a later server removes what a killed one left behind; files
never pile up across restarts. ``serve_workers(config)`` runs uvicorn's worker supervisor (which
replaces a worker that dies), and also tells prometheus-client when a worker is gone, so that
live gauges (in-flight requests, queued rows) stop counting it while its counters still add to
the server's totals.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from socket import socket

from prometheus_client.multiprocess import mark_process_dead
from uvicorn import Config

from gateway.server import GatewaySupervisor

__all__ = ["metrics_dir", "serve_workers"]

_PREFIX = "gateway-metrics-"
_log = logging.getLogger("uvicorn.error")


@contextmanager
def metrics_dir(parent: Path) -> Iterator[Path]:
    """A new directory in ``parent`` for this server's metric files, removed on exit.

    Directories in ``parent`` left by servers that died without removing theirs (no process
    holds their lock any more) are removed first. Raises OSError when ``parent`` is unusable.
    """
    _sweep(parent)
    staging = Path(tempfile.mkdtemp(prefix="." + _PREFIX, dir=parent))
    fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)  # not inherited by the workers
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path = staging.with_name(staging.name.removeprefix("."))
        staging.rename(path)  # visible to _sweep only once locked
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
    finally:
        os.close(fd)


def _sweep(parent: Path) -> None:
    for path in parent.glob(_PREFIX + "*"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its server is running
        finally:
            os.close(fd)
        shutil.rmtree(path, ignore_errors=True)
        _log.info("Removed metric files of a server that is gone: %s", path)


class _Supervisor(GatewaySupervisor):
    """The gateway's worker supervisor, also marking each worker that leaves dead for
    prometheus-client."""

    def __init__(self, config: Config, sockets: list[socket], metrics: Path) -> None:
        super().__init__(config, sockets)
        self._metrics = metrics
        self._pids: set[int] = set()

    def init_processes(self) -> None:
        super().init_processes()
        self._reap()

    def keep_subprocess_alive(self) -> None:
        super().keep_subprocess_alive()
        self._reap()

    def handle_signals(self) -> None:
        super().handle_signals()
        self._reap()

    def _reap(self) -> None:
        live = {p.pid for p in self.processes if p.pid is not None}
        for pid in sorted(self._pids - live):
            mark_process_dead(pid, str(self._metrics))  # type: ignore[no-untyped-call]
            _log.info("Worker [%d] gone: its live gauges left the metrics", pid)
        self._pids = live


def serve_workers(config: Config, metrics: Path) -> None:
    """Bind ``config``'s socket and run ``config.workers`` workers until SIGINT/SIGTERM.

    Exits the process (uvicorn's status 1) when the socket cannot be bound.
    """
    sock = config.bind_socket()
    try:
        _Supervisor(config, [sock], metrics).run()
    finally:
        sock.close()
        if config.uds and os.path.exists(config.uds):
            os.remove(config.uds)
