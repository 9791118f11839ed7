"""Several gateway workers on one socket, with metrics that are the server's.

``metrics_dir(parent)`` gives one server a directory of its own for prometheus-client's
multiprocess files (see ``gateway.metrics``): created at start, removed at exit, and held by a
lock while the server runs, so that a later server removes what a killed one left behind; files
never pile up across restarts. ``serve_workers(config, metrics)`` binds the socket and runs the
gateway's supervisor (``gateway.supervisor``: replaces a worker that dies or whose event loop is
stuck, forwards signals), and tells prometheus-client when a worker is gone, so that live gauges
(in-flight requests, queued rows) stop counting it while its counters still add to the server's
totals.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead

from gateway.server import GatewayConfig
from gateway.supervisor import supervise

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


def serve_workers(config: GatewayConfig, metrics: Path) -> int:
    """Bind ``config``'s socket and serve it with ``config.workers`` workers until SIGINT or
    SIGTERM; the exit status (``gateway.supervisor.supervise``). Each worker that ends is
    marked dead in the metric files in ``metrics``.

    Exits the process (uvicorn's status 3) when the socket cannot be bound.
    """
    sock = config.bind_socket()
    try:
        return supervise(config, sock, on_exit=functools.partial(_gone, metrics))
    finally:
        sock.close()
        if config.uds and os.path.exists(config.uds):
            os.remove(config.uds)


def _gone(metrics: Path, pid: int) -> None:
    """Worker ``pid`` has ended: its live gauges leave the server's metrics; its counters
    stay."""
    mark_process_dead(pid, str(metrics))  # type: ignore[no-untyped-call]
    _log.info("Worker [%d] gone: its live gauges left the metrics", pid)
