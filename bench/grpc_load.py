"""A closed-loop gRPC ``ModelInfer`` load generator that checks every answer's status and
measures itself.

Why it exists: h2load posts one fixed body, so it cannot send a new row per call. This one sends
``bench.grpc_messages.Bodies`` (request ``i`` built from its index, a chunk at a time) through
grpc's own client (``grpc.aio``, generic unary calls on pre-serialized bytes, no protobuf work
per call): ``connections`` channels, each its own TCP connection (a local subchannel pool), each
carrying ``streams`` calls at once; a call's answer starts the next one on its slot.

What it counts: every call's gRPC status (a non-OK status is an error, whenever it happens: in
the warm-up, the measured window or the drain); calls answered OK within the measured window
(after ``warmup_s``, for ``duration_s``) and their latencies; one answer in ``sample_every``
(and the first) decoded and checked (``check_answer``) after the run.

How it measures itself: *lateness* is how late a timer on its event loop fires, probed every
millisecond (a ``timerfd`` on Linux, microsecond-precise; otherwise loop timers, which are
millisecond-grained): the time an answer may wait before the generator can act on it. As in
``bench.loadgen``, the run is invalid when p99 lateness exceeds ``max_lateness_ms`` and
``max_lateness_share`` of the p99 latency; it is invalid too with any error or bad answer. Its
CPU (``time.process_time``, gRPC's own threads included) over the window, divided by the window,
is its CPU share (1.0 = one core); the time its loop thread waited for a CPU (schedstat) too.

Command line: ``python -m bench.grpc_load --address 127.0.0.1:8001 --keys unique --json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
import numpy as np

from bench.grpc_messages import INFER, Bodies, check_answer
from bench.loadgen import Waker, add_generator_options, lateness_bound_us
from bench.lua import PERCENTILES

__all__ = ["Result", "Settings", "main", "run"]

_PROBE_S = 0.001  # the lateness probe's period


@dataclass(frozen=True)
class Settings:
    """One run: ``keys`` (hot, unique) rows of ``model``, ``rows`` per call, at
    ``address``."""

    address: str
    keys: str = "unique"
    model: str = "iris"
    n_features: int = 4
    rows: int = 1
    salt: int = 0
    input_name: str = "input"
    datatype: str = "FP64"
    duration_s: float = 5.0
    warmup_s: float = 0.0
    connections: int = 64
    streams: int = 8  # calls at once per connection
    timeout_s: float = 10.0  # a call's deadline
    max_lateness_ms: float = 1.0
    max_lateness_share: float = 0.1
    sample_every: int = 997  # answers decoded and checked: the first, then one in this many
    max_message_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if not self.duration_s > 0 or self.warmup_s < 0:
            raise ValueError("duration must be positive, warm-up not negative")
        if self.connections < 1 or self.streams < 1 or self.sample_every < 1:
            raise ValueError("connections, streams and sample_every must be >= 1")


@dataclass
class Result:
    """What one run measured; latencies and lateness in microseconds (100: the maximum)."""

    requests: int  # calls answered OK within the window
    seconds: float  # the window
    sent: int  # calls started, in all
    codes: dict[str, int]  # non-OK status codes, whole run
    bad_answers: list[str]  # sampled answers that failed their check (the first few)
    checked: int  # sampled answers checked
    latency_us: dict[float, int]
    lateness_us: dict[float, int]  # 50, 99, 100
    cpu_s: float
    cpu_wait_s: float | None
    connections: int
    streams: int
    rows: int
    max_lateness_ms: float
    max_lateness_share: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def errors(self) -> int:
        return sum(self.codes.values()) + len(self.bad_answers)

    @property
    def cpu_share(self) -> float:
        return self.cpu_s / self.seconds if self.seconds else 0.0

    @property
    def lateness_bound_us(self) -> float:
        return lateness_bound_us(self.max_lateness_ms, self.max_lateness_share,
                                 self.latency_us.get(99.0, 0))

    @property
    def invalid(self) -> str | None:
        """Why the run is not a throughput, or None."""
        if self.codes:
            return "calls failed: " + ", ".join(f"{n} x {c}" for c, n in self.codes.items())
        if self.bad_answers:
            return f"bad answers: {self.bad_answers[0]}"
        if not self.requests:
            return "no call answered in the measured window"
        if self.lateness_us[99.0] > self.lateness_bound_us:
            return (f"generator p99 lateness {self.lateness_us[99.0] / 1000:.2f} ms > "
                    f"{self.lateness_bound_us / 1000:.2f} ms bound")
        return None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["latency_us"] = {f"{k:g}": v for k, v in self.latency_us.items()}
        d["lateness_us"] = {f"{k:g}": v for k, v in self.lateness_us.items()}
        d.update(rps=self.rps, errors=self.errors, cpu_share=self.cpu_share,
                 invalid=self.invalid)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Result:
        kw = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        kw["latency_us"] = {float(k): int(v) for k, v in d["latency_us"].items()}
        kw["lateness_us"] = {float(k): int(v) for k, v in d["lateness_us"].items()}
        return cls(**kw)


class _Probe:
    """Calls ``on_fire(lateness_s)`` every ``_PROBE_S``, with how late each firing was."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 on_fire: Callable[[float], None]) -> None:
        self._on_fire = on_fire
        self._due = time.perf_counter() + _PROBE_S
        self._waker = Waker(loop, self._fired)
        self._waker.arm(self._due)

    def _fired(self) -> None:
        now = time.perf_counter()
        self._on_fire(now - self._due)
        self._due = max(self._due + _PROBE_S, now + _PROBE_S / 2)
        self._waker.arm(self._due)

    def close(self) -> None:
        self._waker.close()


class _Run:
    """The calls and records of one run."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.bodies = Bodies(settings.keys, settings.model, settings.n_features,
                             rows=settings.rows, salt=settings.salt,
                             input_name=settings.input_name, datatype=settings.datatype)
        self.next_i = 0
        self.window = (math.inf, math.inf)  # perf_counter start and end of the window
        self.latencies: list[float] = []
        self.lateness: list[float] = []
        self.codes: Counter[str] = Counter()
        self.ok_total = 0
        self.samples: list[bytes] = []
        self.stop_at = math.inf

    async def slot(self, call: Any) -> None:
        s = self.s
        while time.perf_counter() < self.stop_at:
            i = self.next_i
            self.next_i = i + 1
            start = time.perf_counter()
            try:
                answer = await call(self.bodies[i], timeout=s.timeout_s)
            except grpc.aio.AioRpcError as exc:
                self.codes[exc.code().name] += 1
                continue
            end = time.perf_counter()
            if self.ok_total % s.sample_every == 0:
                self.samples.append(answer)
            self.ok_total += 1
            if self.window[0] <= end < self.window[1]:
                self.latencies.append(end - start)

    def probed(self, late: float) -> None:
        if self.window[0] <= time.perf_counter() < self.window[1]:
            self.lateness.append(late)


async def _measure(settings: Settings) -> tuple[_Run, float, float, float | None]:
    run_ = _Run(settings)
    options = [("grpc.use_local_subchannel_pool", 1),
               ("grpc.max_receive_message_length", settings.max_message_bytes),
               ("grpc.max_send_message_length", settings.max_message_bytes)]
    channels = [grpc.aio.insecure_channel(settings.address, options=options)
                for _ in range(settings.connections)]
    loop = asyncio.get_running_loop()
    probe = _Probe(loop, run_.probed)
    try:
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)),
                               settings.timeout_s)
        calls = [c.unary_unary(INFER, request_serializer=None, response_deserializer=None)
                 for c in channels]
        t0 = time.perf_counter()
        run_.window = (t0 + settings.warmup_s, t0 + settings.warmup_s + settings.duration_s)
        run_.stop_at = run_.window[1]
        marks: dict[str, Any] = {}

        def open_window() -> None:
            marks["cpu"], marks["wait"] = time.process_time(), _cpu_wait_s()

        loop.call_later(settings.warmup_s, open_window)
        async with asyncio.TaskGroup() as tg:
            for call in calls:
                for _ in range(settings.streams):
                    tg.create_task(run_.slot(call))
        cpu1, wait1 = time.process_time(), _cpu_wait_s()
    finally:
        probe.close()
        for c in channels:
            await c.close()
    cpu0, wait0 = marks.get("cpu", cpu1), marks.get("wait")
    waited = None if wait0 is None or wait1 is None else wait1 - wait0
    return run_, cpu1 - cpu0, settings.duration_s, waited


def _percentiles(values: list[float], ps: tuple[float, ...]) -> dict[float, int]:
    if not values:
        return {p: 0 for p in ps}
    got = np.percentile(np.asarray(values, dtype=np.float64), list(ps), method="higher")
    return {float(p): round(float(v) * 1e6) for p, v in zip(ps, got, strict=True)}


def _cpu_wait_s() -> float | None:
    """Seconds this thread has waited on a run queue (Linux schedstat), or None."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def run(settings: Settings) -> Result:
    """Run the load of ``settings`` and measure it (see the module doc). Raises TimeoutError
    when the connections cannot be made ready within ``timeout_s``."""
    gc.collect()
    gc.freeze()
    try:
        run_, cpu_s, seconds, waited = asyncio.run(_measure(settings))
    finally:
        gc.unfreeze()
    bad = [why for a in run_.samples if (why := check_answer(a, settings.rows)) is not None]
    return Result(
        requests=len(run_.latencies), seconds=seconds, sent=run_.next_i,
        codes=dict(run_.codes), bad_answers=bad[:5], checked=len(run_.samples),
        latency_us=_percentiles(run_.latencies, PERCENTILES),
        lateness_us=_percentiles(run_.lateness, (50.0, 99.0, 100.0)),
        cpu_s=cpu_s, cpu_wait_s=waited, connections=settings.connections,
        streams=settings.streams, rows=settings.rows,
        max_lateness_ms=settings.max_lateness_ms,
        max_lateness_share=settings.max_lateness_share, settings=asdict(settings))


# -- command line ----------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.grpc_load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", required=True, help="host:port of the gRPC server")
    p.add_argument("--keys", choices=("hot", "unique"), default="unique")
    p.add_argument("--model", default="iris")
    p.add_argument("--features", type=int, default=4, help="features per row (4)")
    p.add_argument("--rows", type=int, default=1, help="rows per call (1)")
    p.add_argument("--salt", type=int, default=0, help="unique rows: one per run (< 65536)")
    p.add_argument("--input", default="input", help="input tensor name")
    p.add_argument("--datatype", choices=("FP64", "FP32"), default="FP64")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds (5)")
    p.add_argument("--warmup", type=float, default=0.0, help="seconds first, unmeasured")
    p.add_argument("--connections", type=int, default=64, help="connections (64)")
    p.add_argument("--streams", type=int, default=8, help="calls at once per connection (8)")
    p.add_argument("--timeout", type=float, default=10.0, help="a call's deadline, s (10)")
    p.add_argument("--sample-every", type=int, default=997,
                   help="answers checked: the first, then one in this many (997)")
    add_generator_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    result = run(Settings(
        address=args.address, keys=args.keys, model=args.model, n_features=args.features,
        rows=args.rows, salt=args.salt, input_name=args.input, datatype=args.datatype,
        duration_s=args.duration, warmup_s=args.warmup, connections=args.connections,
        streams=args.streams, timeout_s=args.timeout, max_lateness_ms=args.max_lateness_ms,
        max_lateness_share=args.max_lateness_share, sample_every=args.sample_every))
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    lat = result.latency_us
    print(f"{result.rps:,.0f} calls/s ({result.requests} OK in {result.seconds:g} s, "
          f"{result.rows} rows each); errors {result.errors}; latency ms p50 "
          f"{lat[50.0] / 1e3:.2f} p99 {lat[99.0] / 1e3:.2f}; generator: CPU "
          f"{result.cpu_share:.0%} of a core, lateness p99 {result.lateness_us[99.0]} us; "
          f"{result.invalid or 'valid'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
