"""A fixed-arrival-rate (open-loop) HTTP/1.1 load generator that measures itself.

Request ``i`` is due at ``t0 + i / rate`` whatever the server does: a slow answer never delays
the next request (no coordinated omission). Every latency is measured from the request's due
time to the last byte of its answer, so queueing anywhere, in the server or in the generator,
is counted against the figure, never hidden.

How it sends: requests are complete byte strings built before the clock starts
(``bench.doors``); keep-alive connections are opened before the run; a connection carries one
outstanding request at a time, and when every connection is busy a new one is opened, up to
``max_connections`` (then requests wait, in order, for the first free one: that wait is the
server's, and counts in latency). Answers are read by a minimal parser: status line, then
``Content-Length`` bytes of body (an answer without ``Content-Length``, chunked or carrying
extra bytes is a failure, and its connection is closed). One process, one
uvloop event loop, wake-ups from a ``timerfd`` (microsecond precision without spinning)
where Linux offers it, otherwise from loop timers; when the next request is due within
``_SPIN_S`` the loop polls instead of sleeping.

How it measures itself: *lateness* is how long after its due time each request was handed
to a connection by the scheduler (the generator's own delay: its CPU, event-loop stalls,
waiting for a CPU other processes hold). Lateness adds to the latency measured, so a run is
valid only while p99 lateness stays within its bound: ``max_lateness_ms`` or
``max_lateness_share`` of the run's p99 latency, whichever is larger (the generator's part of
the p99 is then at most a millisecond, or a tenth). Otherwise the run is invalid: its
latencies describe the generator or the machine, not the server. The generator's CPU time
(``time.process_time``) over the measured window, divided by the window, is its CPU share
(1.0 = one core); the time it waited for a CPU (``/proc``'s schedstat) is reported too.

Command line: ``python -m bench.loadgen --url http://127.0.0.1:8000 --rate 2000`` (see
``--help``); ``--json`` prints the result as one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import gc
import json
import math
import os
import resource
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import numpy as np

__all__ = ["LATENCY_PERCENTILES", "Result", "Settings", "Waker", "add_generator_options",
           "lateness_bound_us", "main", "run"]

LATENCY_PERCENTILES = (1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 75.0, 80.0, 85.0,
                       90.0, 95.0, 97.5, 99.0, 99.5, 99.9, 100.0)
_SPIN_S = 40e-6  # next request due sooner than this: poll the loop instead of arming a timer
_READ_LIMIT = 16 * 1024 * 1024  # an answer larger than this is a failure (bounded buffers)


@dataclass(frozen=True)
class Settings:
    """One run: ``rate`` requests/s for ``duration_s`` after ``warmup_s`` (same schedule,
    not measured)."""

    url: str
    rate: float
    duration_s: float
    warmup_s: float = 0.0
    connections: int = 8  # opened before the run
    max_connections: int = 512  # bound on connections opened while every one is busy
    max_lateness_ms: float = 1.0  # p99 lateness bound: this, or
    max_lateness_share: float = 0.1  # this share of the p99 latency, whichever is larger
    drain_s: float = 2.0  # after the last due time, wait this long for outstanding answers

    def __post_init__(self) -> None:
        if not self.rate > 0 or not self.duration_s > 0 or self.warmup_s < 0:
            raise ValueError("rate and duration must be positive, warm-up not negative")
        if not 1 <= self.connections <= self.max_connections:
            raise ValueError("need 1 <= connections <= max_connections")

    @property
    def warm_requests(self) -> int:
        return int(self.rate * self.warmup_s)

    @property
    def measured_requests(self) -> int:
        return max(1, int(self.rate * self.duration_s))


@dataclass
class Result:
    """What one run measured. Latency and lateness are in microseconds; ``latency_us[100]``
    is the measured maximum. Unanswered requests count in ``timeouts`` and in latency with
    the time they had waited when the run ended (a lower bound)."""

    rate: float
    duration_s: float
    sent: int  # requests handed to a connection
    answered: int
    errors: int  # answered with a status outside 2xx
    failures: int  # connection lost or refused, malformed or chunked answer
    timeouts: int  # no answer by the end of the drain
    latency_us: dict[float, int]
    lateness_us: dict[float, int]  # 50, 99, 100
    cpu_s: float
    wall_s: float
    connections_opened: int
    max_outstanding: int
    waited_for_connection: int  # requests that found every connection busy
    max_lateness_ms: float
    connect_errors: int = 0  # connections that could not be opened during the run
    max_lateness_share: float = 0.1
    cpu_wait_s: float | None = None  # runnable but not running (other processes had the CPU)
    settings: dict[str, Any] = field(default_factory=dict)
    rusage: dict[str, float] = field(default_factory=dict)

    @property
    def cpu_share(self) -> float:
        """Generator CPU seconds per second of the measured window (1.0 = one core)."""
        return self.cpu_s / self.wall_s if self.wall_s else 0.0

    @property
    def cpu_wait_share(self) -> float | None:
        """Share of the window the generator was runnable but another process ran."""
        return None if self.cpu_wait_s is None or not self.wall_s else (
            self.cpu_wait_s / self.wall_s)

    @property
    def lateness_bound_us(self) -> float:
        return lateness_bound_us(self.max_lateness_ms, self.max_lateness_share,
                                 self.latency_us[99.0])

    @property
    def valid(self) -> bool:
        return self.lateness_us[99.0] <= self.lateness_bound_us

    @property
    def bad(self) -> int:
        """Requests that did not get a 2xx answer."""
        return self.errors + self.failures + self.timeouts

    @property
    def verdict(self) -> str:
        if self.valid:
            return "valid"
        busy = self.cpu_wait_share
        return (f"invalid: generator p99 lateness {self.lateness_us[99.0] / 1000:.2f} ms "
                f"> {self.lateness_bound_us / 1000:.2f} ms bound"
                + (f" (it waited for a CPU {busy:.0%} of the time)" if busy else ""))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["latency_us"] = {_key(k): v for k, v in self.latency_us.items()}
        d["lateness_us"] = {_key(k): v for k, v in self.lateness_us.items()}
        d["cpu_share"] = self.cpu_share
        d["cpu_wait_share"] = self.cpu_wait_share
        d["valid"] = self.valid
        d["lateness_bound_us"] = self.lateness_bound_us
        d["verdict"] = self.verdict
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Result:
        names = set(cls.__dataclass_fields__)
        kw = {k: v for k, v in d.items() if k in names}
        kw["latency_us"] = {float(k): int(v) for k, v in d["latency_us"].items()}
        kw["lateness_us"] = {float(k): int(v) for k, v in d["lateness_us"].items()}
        return cls(**kw)


def lateness_bound_us(max_ms: float, share: float, p99_latency_us: float) -> float:
    """A generator's p99 lateness bound (µs): ``max_ms``, or ``share`` of the run's p99
    latency, whichever is larger; a run late by more is invalid."""
    return max(max_ms * 1000, share * p99_latency_us)


def add_generator_options(p: argparse.ArgumentParser) -> None:
    """``--max-lateness-ms``, ``--max-lateness-share`` (see ``lateness_bound_us``) and
    ``--json``, as every generator of the bench takes them."""
    p.add_argument("--max-lateness-ms", type=float, default=1.0,
                   help="p99 lateness bound, or --max-lateness-share of the p99 latency, "
                        "whichever is larger; above it the run is invalid (1.0)")
    p.add_argument("--max-lateness-share", type=float, default=0.1)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _key(p: float) -> str:
    return f"{p:g}"


# -- wake-ups --------------------------------------------------------------------------------

class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class Waker:
    """Calls ``callback`` at an absolute ``time.perf_counter()`` time.

    On Linux a ``timerfd`` on CLOCK_MONOTONIC (the clock of ``perf_counter``), watched by the
    loop; elsewhere ``loop.call_at`` (millisecond-grained under uvloop).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._fd = -1
        self._handle: asyncio.TimerHandle | None = None
        self._libc: Any = None
        if sys.platform.startswith("linux") and time.get_clock_info(
                "perf_counter").implementation == "clock_gettime(CLOCK_MONOTONIC)":
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            fd = libc.timerfd_create(1, os.O_NONBLOCK | os.O_CLOEXEC)  # CLOCK_MONOTONIC
            if fd >= 0:
                self._libc, self._fd = libc, fd
                loop.add_reader(fd, self._fired)

    def arm(self, when: float) -> None:
        if self._fd >= 0:
            sec = math.floor(when)
            spec = _Itimerspec(_Timespec(0, 0), _Timespec(sec, int((when - sec) * 1e9)))
            self._libc.timerfd_settime(self._fd, 1, ctypes.byref(spec), None)  # ABSTIME
            return
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._loop.call_at(
            self._loop.time() + max(0.0, when - time.perf_counter()), self._callback)

    def _fired(self) -> None:
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            return
        self._callback()

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
        if self._handle is not None:
            self._handle.cancel()


# -- one connection --------------------------------------------------------------------------

class _Conn(asyncio.Protocol):
    """One keep-alive connection with at most one outstanding request (``index`` >= 0)."""

    __slots__ = ("_buf", "_gen", "_need", "_status", "close_after", "index", "transport")

    def __init__(self, gen: _Generator) -> None:
        self._gen = gen
        self.transport: asyncio.Transport | None = None
        self.index = -1
        self._buf = b""
        self._need = -1  # total bytes of the answer being read, once its head is parsed
        self._status = 0
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._gen.opened(self)

    def send(self, index: int) -> None:
        assert self.transport is not None
        self.index = index
        self.transport.write(self._gen.requests[index])

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        if self._need < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 65536:
                    self._fail()
                    return
                self._buf = buf
                return
            head = buf[:end].lower()
            try:
                self._status = int(head[9:12])
            except ValueError:
                self._fail()
                return
            at = head.find(b"\r\ncontent-length:")
            if at < 0 or b"\r\ntransfer-encoding:" in head:
                self._fail()
                return
            stop = head.find(b"\r\n", at + 17)
            try:
                length = int(head[at + 17:stop if stop > 0 else None])
            except ValueError:
                self._fail()
                return
            if length > _READ_LIMIT:
                self._fail()
                return
            self.close_after = b"\r\nconnection: close" in head
            self._need = end + 4 + length
        if len(buf) < self._need:
            self._buf = buf
            return
        if len(buf) > self._need or self.index < 0:  # bytes nobody asked for
            self._fail()
            return
        self._buf = b""
        self._need = -1
        self._gen.answered(self, self._status)

    def _fail(self) -> None:
        self._buf = b""
        self._need = -1
        if self.transport is not None:
            self.transport.abort()  # connection_lost records the failure

    def connection_lost(self, exc: Exception | None) -> None:
        self._gen.lost(self)


# -- the run ---------------------------------------------------------------------------------

class _Generator:
    """The schedule, the connection pool and the records of one run."""

    def __init__(self, loop: asyncio.AbstractEventLoop, requests: Sequence[bytes],
                 settings: Settings, host: str, port: int,
                 on_window: Callable[[], None]) -> None:
        self.loop = loop
        self.window = settings.warm_requests  # the first measured request
        self.on_window = on_window
        self.requests = requests
        self.settings = settings
        self.host, self.port = host, port
        n = len(requests)
        self.n = n
        self.gap = 1.0 / settings.rate
        self.t0 = 0.0
        self.next_i = 0
        self.done_at = [math.nan] * n  # answer time (perf_counter), NaN: none
        self.status = [0] * n  # HTTP status; -1: failure
        self.late = [math.nan] * n  # dispatch time minus due time
        self.idle: list[_Conn] = []
        self.pending: deque[int] = deque()  # requests waiting for a free connection
        self.conns: set[_Conn] = set()
        self.opening = 0
        self.opened_total = 0
        self.connect_errors = 0
        self.outstanding = 0
        self.max_outstanding = 0
        self.waited = 0
        self.all_sent = False
        self.closing = False  # the run is over: connections lost now are ours to close
        self.drained: asyncio.Future[None] = loop.create_future()
        self.ready: asyncio.Future[None] = loop.create_future()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.waker = Waker(loop, self.tick)

    # connections -------------------------------------------------------------------------
    def open(self) -> None:
        self.opening += 1
        task = self.loop.create_task(self._connect())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self) -> None:
        try:
            await self.loop.create_connection(lambda: _Conn(self), self.host, self.port)
        except OSError:
            self.opening -= 1
            self.connect_errors += 1
            if not self.ready.done():
                self.ready.set_exception(ConnectionError(
                    f"cannot connect to {self.host}:{self.port}"))

    def opened(self, conn: _Conn) -> None:
        self.opening -= 1
        if self.closing:
            assert conn.transport is not None
            conn.transport.abort()
            return
        self.opened_total += 1
        self.conns.add(conn)
        self._free(conn)
        if not self.ready.done() and len(self.conns) >= self.settings.connections:
            self.ready.set_result(None)

    def _free(self, conn: _Conn) -> None:
        if self.pending:
            conn.send(self.pending.popleft())
        else:
            self.idle.append(conn)

    def lost(self, conn: _Conn) -> None:
        self.conns.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        if self.closing:
            return
        if conn.index >= 0:
            self._finish(conn.index, -1)
            conn.index = -1
        if self.pending and len(self.conns) + self.opening < self.settings.max_connections:
            self.open()  # the failed request is counted; the waiting ones need a connection

    # sending -----------------------------------------------------------------------------
    def tick(self) -> None:
        if self.closing:
            return
        i, n, t0, gap = self.next_i, self.n, self.t0, self.gap
        now = time.perf_counter()
        while i < n:
            due = t0 + i * gap
            if due > now:
                now = time.perf_counter()
                if due > now:
                    break
            if i == self.window:
                self.on_window()
            self.late[i] = time.perf_counter() - due
            self._dispatch(i)
            i += 1
        self.next_i = i
        if i >= n:
            self.all_sent = True
            self._check_drained()
            return
        wait = t0 + i * gap - time.perf_counter()
        if wait <= _SPIN_S:
            self.loop.call_soon(self.tick)
        else:
            self.waker.arm(t0 + i * gap)

    def _dispatch(self, i: int) -> None:
        self.outstanding += 1
        if self.outstanding > self.max_outstanding:
            self.max_outstanding = self.outstanding
        if self.idle:
            self.idle.pop().send(i)
            return
        self.waited += 1
        self.pending.append(i)
        if len(self.conns) + self.opening < self.settings.max_connections:
            self.open()

    # answers -----------------------------------------------------------------------------
    def answered(self, conn: _Conn, status: int) -> None:
        i = conn.index
        conn.index = -1
        self._finish(i, status)
        if conn.close_after:
            assert conn.transport is not None
            conn.transport.close()
            return
        self._free(conn)

    def _finish(self, i: int, status: int) -> None:
        self.done_at[i] = time.perf_counter()
        self.status[i] = status
        self.outstanding -= 1
        self._check_drained()

    def _check_drained(self) -> None:
        if self.all_sent and self.outstanding == 0 and not self.drained.done():
            self.drained.set_result(None)

    async def run(self) -> float:
        """Open connections, send on schedule, wait for answers; the end time."""
        for _ in range(self.settings.connections):
            self.open()
        await self.ready
        self.t0 = time.perf_counter() + 0.001
        self.waker.arm(self.t0)
        last_due = self.t0 + (self.n - 1) * self.gap
        try:
            await asyncio.wait_for(asyncio.shield(self.drained),
                                   timeout=last_due - time.perf_counter()
                                   + self.settings.drain_s)
        except TimeoutError:
            pass
        end = time.perf_counter()
        self.closing = True
        self.waker.close()
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        return end


def _percentiles(values: np.ndarray, ps: Sequence[float]) -> dict[float, int]:
    if values.size == 0:
        return {p: 0 for p in ps}
    got = np.percentile(values, list(ps), method="higher")
    return {p: round(float(v) * 1e6) for p, v in zip(ps, got, strict=True)}


def _cpu_wait_s() -> float | None:
    """Seconds this process has waited on a run queue (Linux schedstat), or None."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def run(requests: Sequence[bytes], settings: Settings) -> Result:
    """Send ``requests`` (warm-up ones first) at ``settings.rate`` and measure.

    ``len(requests)`` must be ``settings.warm_requests + settings.measured_requests``.
    Raises ConnectionError when the first connections cannot be opened.
    """
    import uvloop

    expected = settings.warm_requests + settings.measured_requests
    if len(requests) != expected:
        raise ValueError(f"need {expected} requests (warm-up + measured), got {len(requests)}")
    parts = urlsplit(settings.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            cpu0 = [0.0]
            ru0: list[resource.struct_rusage] = []
            w = settings.warm_requests
            wait0: list[float | None] = []

            def mark_start() -> None:  # when the measured window opens
                cpu0[0] = time.process_time()
                ru0.append(resource.getrusage(resource.RUSAGE_SELF))
                wait0.append(_cpu_wait_s())

            gen = _Generator(runner.get_loop(), requests, settings, host, port, mark_start)
            end = runner.run(gen.run())
            if not ru0:  # so late that the measured window never opened: an empty one
                mark_start()
            cpu1 = time.process_time()
            ru1 = resource.getrusage(resource.RUSAGE_SELF)
            wait1 = _cpu_wait_s()
    finally:
        gc.enable()
        gc.unfreeze()
    start = gen.t0 + w * gen.gap
    wall = max(1e-9, end - start)
    ru_start = ru0[0]
    n = gen.n
    due = gen.t0 + np.arange(n, dtype=np.float64) * gen.gap
    done_at = np.asarray(gen.done_at[w:], dtype=np.float64)
    status = np.asarray(gen.status[w:], dtype=np.int64)
    late = np.asarray(gen.late[w:], dtype=np.float64)
    due = due[w:]
    answered_mask = ~np.isnan(done_at)
    lat = np.where(answered_mask, done_at - due, end - due)
    failures = int(np.count_nonzero(status < 0))
    answered = int(np.count_nonzero(answered_mask)) - failures
    errors = int(np.count_nonzero((status > 0) & ((status < 200) | (status >= 300))))
    sent_mask = ~np.isnan(late)
    return Result(
        rate=settings.rate, duration_s=settings.duration_s,
        sent=int(np.count_nonzero(sent_mask)), answered=answered, errors=errors,
        failures=failures, timeouts=int(np.count_nonzero(~answered_mask)),
        latency_us=_percentiles(lat, LATENCY_PERCENTILES),
        lateness_us=_percentiles(late[sent_mask], (50.0, 99.0, 100.0)),
        cpu_s=cpu1 - cpu0[0], wall_s=wall,
        cpu_wait_s=None if wait1 is None or wait0[0] is None else wait1 - wait0[0],
        connections_opened=gen.opened_total, max_outstanding=gen.max_outstanding,
        waited_for_connection=gen.waited, connect_errors=gen.connect_errors,
        max_lateness_ms=settings.max_lateness_ms,
        max_lateness_share=settings.max_lateness_share,
        settings=asdict(settings),
        rusage={"voluntary_switches": float(ru1.ru_nvcsw - ru_start.ru_nvcsw),
                "involuntary_switches": float(ru1.ru_nivcsw - ru_start.ru_nivcsw)},
    )


# -- command line ----------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    from bench.doors import DOORS

    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="http://host:port of the server")
    p.add_argument("--rate", type=float, required=True, help="requests per second")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds (5)")
    p.add_argument("--warmup", type=float, default=0.0, help="seconds sent first, unmeasured")
    p.add_argument("--door", choices=DOORS, default="get")
    p.add_argument("--keys", choices=("hot", "unique", "zipf"), default="unique")
    p.add_argument("--rows", type=int, default=1, help="rows per request (POST doors)")
    p.add_argument("--model", default="iris")
    p.add_argument("--features", default="sepal_length,sepal_width,petal_length,petal_width",
                   help="comma-separated feature names, in the model's order")
    p.add_argument("--salt", type=int, default=0,
                   help="unique rows: one per run (< 65536); zipf: the draws' seed")
    p.add_argument("--zipf-n", type=int, default=10_000, help="zipf: rows in the set")
    p.add_argument("--zipf-s", type=float, default=1.1, help="zipf: exponent")
    p.add_argument("--v2-input", default="input", help="V2 input tensor name")
    p.add_argument("--v2-datatype", choices=("FP64", "FP32"), default="FP64")
    p.add_argument("--connections", type=int, default=8, help="opened before the run (8)")
    p.add_argument("--max-connections", type=int, default=512)
    p.add_argument("--drain", type=float, default=2.0,
                   help="seconds to wait for answers after the last due time (2)")
    add_generator_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from bench.doors import Load, build

    args = parser().parse_args(argv)
    settings = Settings(url=args.url.rstrip("/"), rate=args.rate, duration_s=args.duration,
                        warmup_s=args.warmup, connections=args.connections,
                        max_connections=_fd_bound(args.max_connections),
                        max_lateness_ms=args.max_lateness_ms,
                        max_lateness_share=args.max_lateness_share, drain_s=args.drain)
    load = Load(door=args.door, keys=args.keys, rows=args.rows, model=args.model,
                features=tuple(f for f in args.features.split(",") if f), salt=args.salt,
                v2_input=args.v2_input, v2_datatype=args.v2_datatype, zipf_n=args.zipf_n,
                zipf_s=args.zipf_s, seed=args.salt)
    netloc = urlsplit(settings.url).netloc
    requests = build(load, settings.warm_requests + settings.measured_requests, netloc)
    result = run(requests, settings)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(_summary(result))
    return 0


def _summary(r: Result) -> str:
    lat = r.latency_us
    return (f"{r.rate:g} req/s for {r.duration_s:g} s: sent {r.sent}, answered {r.answered}, "
            f"errors {r.errors}, failures {r.failures}, timeouts {r.timeouts}\n"
            f"latency ms: p50 {lat[50.0] / 1e3:.3f}  p90 {lat[90.0] / 1e3:.3f}  "
            f"p99 {lat[99.0] / 1e3:.3f}  max {lat[100.0] / 1e3:.3f}\n"
            f"generator: lateness p50 {r.lateness_us[50.0]} us, p99 {r.lateness_us[99.0]} us;"
            f" CPU {r.cpu_share:.0%} of a core{_waited(r)}; {r.connections_opened} connections; "
            f"{r.verdict}")


def _waited(r: Result) -> str:
    share = r.cpu_wait_share
    return "" if share is None else f", waited for a CPU {share:.0%} of the time"


def _fd_bound(wanted: int) -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(1, min(wanted, soft - 64)) if soft > 0 else wanted


if __name__ == "__main__":
    sys.exit(main())
