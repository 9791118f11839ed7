"""Several worker processes serving one listening socket: the gateway's own supervisor.

``supervise(config, sock)`` starts ``config.workers`` worker processes, each running a
``GatewayServer`` (``gateway.server``) on ``sock``, which the caller has bound once, and keeps
that many running until SIGINT or SIGTERM. It returns the exit status for the process.

**Workers** are new interpreters (multiprocessing's *spawn* start method), not forks of the
supervisor: by the time it runs, the supervisor has imported prometheus-client, which picks its
single- or multi-process mode at import from ``PROMETHEUS_MULTIPROC_DIR`` (``gateway.metrics``);
a fresh interpreter imports everything with the environment the caller has set, holds no copy
of the supervisor's threads, locks or signal handlers, and costs its import time only when a
worker starts. A worker leaves the supervisor's process group, so that a terminal's Ctrl+C
reaches the supervisor alone, which forwards it once.

**A worker that ends** is replaced, whatever its status, and ``on_exit(pid)`` is called for it
(and for every worker that ends at shutdown): the caller's bookkeeping, such as
prometheus-client's ``mark_process_dead``. Except a worker that failed to start (status 3,
``uvicorn.config.STARTUP_FAILURE``: its app, store or settings would fail the same way again):
then the other workers are stopped as on SIGTERM and ``supervise`` returns 3, never looping.

**Health check.** Once its server has started, each worker's event loop sends one byte on a
socket pair at once and then every ``config.timeout_worker_healthcheck / 4`` seconds; the
first is logged ("Worker [pid] is serving"). A worker from which
nothing has come for ``config.timeout_worker_healthcheck`` seconds (its loop is stuck in a
blocking call, or the process is stopped) is killed (SIGKILL), then replaced as above; so is a
worker whose server has stopped by itself but whose process is still there ``grace + 10 s``
later (``grace``: ``config.shutdown_grace_s``). Startup is not timed: a long model load is not
a stuck loop. A worker whose supervisor is gone (the pair is closed) shuts down by itself, in
its phases.

**Signals.** SIGINT or SIGTERM: the same signal is sent to every worker, which shuts down in
its phases within its grace period (``gateway.server``); the supervisor stops accepting on its
copy of the socket and waits. A second one is forwarded too (uvicorn's server then stops at
once). Workers still running ``grace + 10 s`` after the first are killed. SIGHUP is forwarded
to every worker that has started, whose app reloads the model store (``gateway.app``); a
worker still starting gets it once started; once stopping, SIGHUP is ignored. Workers are
never restarted by a signal, and no other signal is handled.

**Returns** 0 when every worker ended with status 0 after SIGINT or SIGTERM (or by that signal,
when it came before a starting worker could handle it); 3 after a startup failure; 1 when a
worker had to be killed at shutdown or ended otherwise then.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.context import SpawnProcess

import uvloop
from uvicorn.config import STARTUP_FAILURE

from gateway.server import GatewayConfig, GatewayServer

__all__ = ["supervise"]

log = logging.getLogger("uvicorn.error")

_SPAWN = multiprocessing.get_context("spawn")
_BEATS_PER_TIMEOUT = 4
_STOP_MARGIN_S = 10.0  # past the grace period: the phases after it, interpreter exit
_HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def supervise(config: GatewayConfig, sock: socket.socket,
              on_exit: Callable[[int], None] | None = None) -> int:
    """Serve ``sock`` with ``config.workers`` workers until SIGINT or SIGTERM; the exit status.

    Runs in the main thread (it handles signals). See the module docstring.
    """
    return _Supervisor(config, sock, on_exit or (lambda _pid: None)).run()


@dataclass(eq=False)
class _Worker:
    process: SpawnProcess
    beat: socket.socket | None  # the supervisor's end of the heartbeat pair; None once closed
    started: bool = False  # its first heartbeat has come
    hup_pending: bool = False  # SIGHUP came while it was starting
    # When it is killed unless it beats again (or ends) first: None while starting.
    deadline: float | None = None
    overdue: str = ""  # what the deadline stands for, for the log
    killed: bool = False  # by the supervisor


class _Supervisor:
    """The supervisor's state, changed only by its own loop (``run``)."""

    def __init__(self, config: GatewayConfig, sock: socket.socket,
                 on_exit: Callable[[int], None]) -> None:
        self.config = config
        self.sock = sock
        self.on_exit = on_exit
        self.timeout_s = float(config.timeout_worker_healthcheck)
        self.stop_s = float(config.shutdown_grace_s) + _STOP_MARGIN_S
        self.workers: list[_Worker] = []
        self.stopping = False  # since the first SIGINT/SIGTERM, or a startup failure
        self.status = 0

    def run(self) -> int:
        log.info("Started supervisor process [%d] of %d workers", os.getpid(),
                 self.config.workers)
        with _signal_wakeup() as wakeup:
            for _ in range(self.config.workers):
                self._spawn()
            while self.workers:
                beats: dict[socket.socket, _Worker] = {}
                for w in self.workers:
                    if w.beat is not None:
                        beats[w.beat] = w
                ends = {w.process.sentinel: w for w in self.workers}
                ready = wait([wakeup, *beats, *ends], timeout=self._next_deadline())
                if wakeup in ready:
                    self._signals(wakeup)
                for w in (beats[r] for r in ready if r in beats):
                    self._heard(w)
                for w in (ends[r] for r in ready if r in ends):
                    self._ended(w)
                self._kill_overdue()
        log.info("Stopping supervisor process [%d]", os.getpid())
        return self.status

    # -- events ------------------------------------------------------------------------------
    def _signals(self, wakeup: socket.socket) -> None:
        for signum in _drain(wakeup):
            if signum == signal.SIGHUP and not self.stopping:  # (a stopping app has no handler)
                log.info("Received SIGHUP: the workers reload the model store")
                for w in self.workers:
                    if w.started:
                        _send(w, signal.SIGHUP)
                    else:
                        w.hup_pending = True
            elif signum in (signal.SIGINT, signal.SIGTERM):
                log.info("Received %s: stopping the workers", signal.Signals(signum).name)
                self._stop(signum)

    def _heard(self, w: _Worker) -> None:
        assert w.beat is not None
        try:
            data = w.beat.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the worker is ending by itself: its exit comes next
            w.beat.close()
            w.beat = None
            if not self.stopping:
                self._expect(w, self.stop_s, "still running %.0f s after its server stopped")
            return
        if not w.started:
            w.started = True
            log.info("Worker [%d] is serving: its heartbeat is checked from now on",
                     w.process.pid)
        if not self.stopping:
            self._expect(w, self.timeout_s, "sent no heartbeat for %.1f s (its event loop is "
                                            "stuck)")
        if w.hup_pending:
            w.hup_pending = False
            _send(w, signal.SIGHUP)

    def _ended(self, w: _Worker) -> None:
        w.process.join()
        pid, status = w.process.pid, w.process.exitcode
        assert pid is not None and status is not None
        self.workers.remove(w)
        if w.beat is not None:
            w.beat.close()
        w.process.close()
        self.on_exit(pid)
        if self.stopping:
            if w.killed or status not in (0, -signal.SIGINT, -signal.SIGTERM):
                log.warning("Worker [%d] ended with %s", pid, _describe(status))
                self.status = self.status or 1
            return
        if status == STARTUP_FAILURE:
            log.error("Worker [%d] failed to start: stopping the server", pid)
            self.status = STARTUP_FAILURE
            self._stop(signal.SIGTERM)
            return
        log.warning("Worker [%d] ended with %s: starting another", pid, _describe(status))
        self._spawn()

    # -- time --------------------------------------------------------------------------------
    def _expect(self, w: _Worker, within_s: float, overdue: str) -> None:
        w.deadline = time.monotonic() + within_s
        w.overdue = overdue % within_s

    def _next_deadline(self) -> float | None:
        """Seconds until the next worker's deadline (None: none is timed)."""
        due = [w.deadline for w in self.workers if w.deadline is not None and not w.killed]
        return max(0.0, min(due) - time.monotonic()) if due else None

    def _kill_overdue(self) -> None:
        now = time.monotonic()
        for w in self.workers:
            if w.deadline is not None and now >= w.deadline and not w.killed:
                log.error("Worker [%s] %s: killing it", w.process.pid, w.overdue)
                w.killed = True
                _send(w, signal.SIGKILL)

    # -- actions -----------------------------------------------------------------------------
    def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        process = _SPAWN.Process(
            target=_work, args=(self.config, self.sock, theirs,
                                self.timeout_s / _BEATS_PER_TIMEOUT),
            name="gateway-worker")
        process.start()
        theirs.close()  # the worker's copy is its own now
        ours.setblocking(False)
        self.workers.append(_Worker(process, ours))

    def _stop(self, signum: int) -> None:
        if not self.stopping:
            self.stopping = True
            self.sock.close()  # intake ends as soon as the workers close their copies
            for w in self.workers:
                self._expect(w, self.stop_s, "still running %.0f s after it was asked to stop")
        for w in self.workers:
            _send(w, signum)


def _send(w: _Worker, signum: int) -> None:
    if w.process.pid is not None and w.process.exitcode is None:
        try:
            os.kill(w.process.pid, signum)
        except ProcessLookupError:  # ended meanwhile: its sentinel says so next
            pass


def _describe(status: int) -> str:
    if status >= 0:
        return f"status {status}"
    try:
        return f"signal {signal.Signals(-status).name}"
    except ValueError:
        return f"signal {-status}"


@contextmanager
def _signal_wakeup() -> Iterator[socket.socket]:
    """A socket that becomes readable when SIGINT, SIGTERM or SIGHUP arrives, one byte per
    signal (its number); the previous handlers restored on exit."""
    readable, writable = socket.socketpair()
    readable.setblocking(False)
    writable.setblocking(False)
    previous_fd = signal.set_wakeup_fd(writable.fileno(), warn_on_full_buffer=False)
    previous = {signum: signal.signal(signum, _note) for signum in _HANDLED}
    try:
        yield readable
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(previous_fd)
        readable.close()
        writable.close()


def _note(_signum: int, _frame: object) -> None:
    """The Python-level handler: the signal's number is already on the wakeup socket."""


def _drain(wakeup: socket.socket) -> list[int]:
    signums: list[int] = []
    while True:
        try:
            data = wakeup.recv(512)
        except BlockingIOError:
            return signums
        if not data:
            return signums
        signums += data


# -- in the worker process ----------------------------------------------------------------------

def _work(config: GatewayConfig, sock: socket.socket, beat: socket.socket,
          period_s: float) -> None:
    """A worker's main: serve ``sock`` until the server stops; exit with status 3 if it never
    started."""
    os.setpgid(0, 0)  # out of the supervisor's process group: signals come through it
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the app handles it (once started)
    config.configure_logging()
    server = GatewayServer(config)
    loop_factory = uvloop.new_event_loop if config.loop in ("auto", "uvloop") else None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(server, sock, beat, period_s))
    if not server.started:
        sys.exit(STARTUP_FAILURE)


async def _serve(server: GatewayServer, sock: socket.socket, beat: socket.socket,
                 period_s: float) -> None:
    heart = asyncio.get_running_loop().create_task(_heartbeat(server, beat, period_s))
    try:
        await server.serve(sockets=[sock])
    finally:
        heart.cancel()
        await asyncio.wait([heart])
        beat.close()


async def _heartbeat(server: GatewayServer, beat: socket.socket, period_s: float) -> None:
    """One byte every ``period_s`` once ``server`` has started, from the event loop itself;
    shut the server down when the supervisor is gone."""
    beat.setblocking(False)
    while True:
        if not server.started:  # the first beat as soon as it has: checked from then on
            await asyncio.sleep(min(period_s, 0.05))
            continue
        try:
            beat.send(b".")
        except BlockingIOError:  # the supervisor has not read the earlier ones yet
            pass
        except OSError:  # the pair is closed: the supervisor is gone
            log.warning("The supervisor is gone: shutting down")
            server.should_exit = True
            return
        await asyncio.sleep(period_s)
