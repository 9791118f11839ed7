"""Prometheus metrics of one app instance, and the one way to scrape them: ``render()``.

Two modes, chosen when ``Metrics`` is built from the environment:

* **One process** (``PROMETHEUS_MULTIPROC_DIR`` unset, the default): every metric lives in a
  registry of this object's own (no global state), and ``render()`` reads it.
* **Several workers of one server** (``PROMETHEUS_MULTIPROC_DIR`` set before the process
  started, as ``python -m gateway --workers N`` does): prometheus-client's multiprocess mode.
  Each value is written to a memory-mapped file of this worker in that directory, and
  ``render()``, in whichever worker the scrape reaches, merges the files of every worker.
  Counters and histograms are summed over every worker the server has run, so totals are the
  server's and never go back when a worker is replaced. Gauges are merged by the mode given
  where each is declared; ``live*`` modes leave out workers that died (their supervisor calls
  ``mark_process_dead``, see ``gateway.workers``). Each write costs ~1 µs instead of ~0.3 µs.

``in_flight`` is an ``int`` attribute: hot-path code does ``metrics.in_flight += 1`` and
``-= 1`` on the event loop, which in one process is an attribute write read at scrape time.

With several workers, gauges that one worker knows and another must report, the in-flight count
and gauges read from a function (``set_function``), are sampled into the worker's file: at each
scrape it answers, at most every 100 ms as its in-flight count changes, and when that count
returns to zero after a non-zero sample (so an idle worker reports zeros). What a busy worker
reports lags its last request start or end by at most 100 ms; the hot path pays one clock read
per change instead of a file write.
"""

from __future__ import annotations

import gc
import os
import resource
import time
from bisect import bisect_left
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["CONTENT_TYPE", "MULTIPROC_ENV", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""The directory of prometheus-client's multiprocess files; set means several workers."""

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_SAMPLE_EVERY_S = 0.1


class Metrics:
    """Every metric the gateway exports. The prometheus-client objects are thread-safe;
    ``in_flight`` is changed on the event loop only.

    ``environ`` (default ``os.environ``) selects the mode; multiprocess mode requires
    ``PROMETHEUS_MULTIPROC_DIR`` to have been set before prometheus-client was imported, and
    raises RuntimeError otherwise (values would silently stay per process).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        mp_dir = (os.environ if environ is None else environ).get(MULTIPROC_ENV)
        multiprocess = bool(getattr(values.ValueClass, "_multiprocess", False))
        if (mp_dir is not None) != multiprocess:
            raise RuntimeError(
                f"{MULTIPROC_ENV} must be set (or unset) before the process starts: "
                f"it is {'set' if mp_dir is not None else 'unset'} but prometheus-client was "
                f"imported {'without' if mp_dir is not None else 'with'} it")
        self.multiprocess = mp_dir is not None
        self.tally = Tally()
        """Where the per-request and per-call metrics are counted (flushed on render)."""
        r = self.registry = CollectorRegistry(auto_describe=True)
        self._scrape = r
        if mp_dir is not None:
            self._scrape = CollectorRegistry()
            MultiProcessCollector(self._scrape, path=mp_dir)  # type: ignore[no-untyped-call]

        self.requests = Counter(
            "gateway_requests", "HTTP requests by route template and status.",
            ["route", "status"], registry=r,
        )
        self.request_seconds = Histogram(
            "gateway_request_seconds", "HTTP request latency.", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.grpc_requests = Counter(  # counted through the tally (gateway.protocols.grpc_v2)
            "gateway_grpc_requests", "gRPC calls by method and status code.",
            ["method", "code"], registry=r,
        )
        self.grpc_request_seconds = Histogram(
            "gateway_grpc_request_seconds", "gRPC call latency.", ["method"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.fast_lane = Counter(  # counted through the tally (gateway.lane)
            "gateway_fast_lane_requests", "Door requests taken by the HTTP fast lane, by how "
            "they were answered (answered: written at once, no task; continued: in a task, "
            "having to wait).", ["how"], registry=r,
        )
        self.fast_lane_bypassed = Counter(  # counted through the tally (gateway.server)
            "gateway_fast_lane_bypassed", "Door requests answered by the ASGI app in a task "
            "instead of the fast lane, by reason (body: large, chunked or 100-continue; "
            "pipelined: started after an earlier response; shutdown: held at shutdown).",
            ["reason"], registry=r,
        )
        self._in_flight = 0
        in_flight = Gauge(  # workers: sum over live workers (sampled, see the module doc)
            "gateway_requests_in_flight", "HTTP requests and gRPC calls being answered now.",
            registry=r, multiprocess_mode="livesum",
        )
        self._sampler: _Sampler | None = None
        if self.multiprocess:
            self._sampler = _Sampler(self.tally)
            self._sampler.add(in_flight, lambda: self._in_flight)
        else:
            in_flight.set_function(lambda: self._in_flight)
        self.cache_lookups = Counter(
            "gateway_cache_lookups",
            "Cache lookups by tier (l1, l2) and result (hit, miss, error).",
            ["tier", "result"], registry=r,
        )
        self.coalesced = Counter(
            "gateway_coalesced", "Rows answered by another request's in-flight computation.",
            ["model"], registry=r,
        )
        self.model_calls = Counter(
            "gateway_model_calls", "Model predict invocations.", ["model", "version"], registry=r,
        )
        self.model_rows = Counter(
            "gateway_model_rows", "Rows passed to the model.", ["model", "version"], registry=r,
        )
        self.model_exec = Counter(
            "gateway_model_exec", "Model calls by where they ran (inline, thread).",
            ["model", "version", "place"], registry=r,
        )
        self.model_call_seconds = Gauge(  # workers: the most recently updated live worker's
            "gateway_model_call_seconds_avg", "Moving average of one model call's duration.",
            ["model", "version"], registry=r, multiprocess_mode="livemostrecent",
        )
        self.batch_rows = Histogram(
            "gateway_batch_rows", "Rows per dispatched batch.", buckets=_BATCH_BUCKETS, registry=r,
        )
        queue_rows = Gauge(  # workers: sum over live workers (sampled, see the module doc)
            "gateway_queue_rows", "Rows waiting for a model call.", ["model"], registry=r,
            multiprocess_mode="livesum",
        )
        self.queue_rows: Gauge | _SampledGauge = (
            queue_rows if self._sampler is None else _SampledGauge(queue_rows, self._sampler))
        self.rejected = Counter(
            "gateway_rejected", "Requests refused, by reason (error code).", ["reason"],
            registry=r,
        )
        self.redis_errors = Counter(
            "gateway_redis_errors", "Redis calls that failed or timed out.", registry=r,
        )
        self.circuit_open = Gauge(  # workers: 1 while any live worker's circuit is open
            "gateway_circuit_open", "1 while the Redis circuit breaker skips Redis.", registry=r,
            multiprocess_mode="livemax",
        )
        self.l2_consulted = Gauge(  # workers: 1 while any live worker consults Redis for it
            "gateway_l2_consulted", "1 while misses of the model version are looked up in "
            "Redis, 0 while they skip it (their call costs less than a Redis round trip).",
            ["model", "version"], registry=r, multiprocess_mode="livemax",
        )
        self.redis_round_trip = Gauge(  # workers: the most recently updated live worker's
            "gateway_redis_round_trip_seconds", "Redis round trip as measured by periodic "
            "PINGs (minimum over the recent window).", registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.model_loads = Counter(
            "gateway_model_loads", "Model versions loaded, by result (loaded, failed).",
            ["model", "result"], registry=r,
        )
        self.gc_collections = Counter(
            "gateway_gc_collections", "Garbage collections, by generation.", ["generation"],
            registry=r,
        )
        self.gc_pause_seconds = Counter(
            "gateway_gc_pause_seconds", "Time spent in garbage collections, by generation.",
            ["generation"], registry=r,
        )
        for name, doc, read in (
            ("gateway_process_cpu_seconds", "CPU time used (user + system), seconds.",
             _cpu_seconds),
            ("gateway_process_resident_memory_bytes", "Resident memory, bytes.", _rss_bytes),
            ("gateway_process_open_fds", "Open file descriptors.", _open_fds),
        ):  # workers: summed over live workers (sampled like the in-flight count)
            gauge = Gauge(name, doc + " Summed over live workers.", registry=r,
                          multiprocess_mode="livesum")
            if self._sampler is not None:
                self._sampler.add(gauge, read)
            else:
                gauge.set_function(read)
        self.l2_writes_dropped = Counter(
            "gateway_l2_writes_dropped", "Cache writes not sent to Redis (backlog full, circuit "
            "open or write failed).", registry=r,
        )
        self.remote_coalesced = Counter(
            "gateway_remote_coalesced", "Rows answered by another replica's computation "
            "(cross-replica single-flight).", ["model"], registry=r,
        )
        self.remote_leases = Counter(
            "gateway_remote_leases", "Row leases won in Redis: rows this replica computed for "
            "every replica.", ["model"], registry=r,
        )
        self.remote_lease_expiries = Counter(
            "gateway_remote_lease_expiries", "Rows whose lease ended without a result (holder "
            "lost or failed), then computed here.", ["model"], registry=r,
        )
        self.remote_fallbacks = Counter(
            "gateway_remote_fallbacks", "Rows computed without cross-replica coordination "
            "because Redis was skipped, failed or timed out.", ["model"], registry=r,
        )

    @property
    def in_flight(self) -> int:
        """Requests being answered now by this process."""
        return self._in_flight

    @in_flight.setter
    def in_flight(self, n: int) -> None:
        self._in_flight = n
        if self._sampler is not None:
            self._sampler.in_flight_changed(n)

    def watch_gc(self) -> Callable[[], None]:
        """Count collections and their pauses by generation until the returned function is
        called (``gc.callbacks`` is process-wide: the app's lifespan installs and removes it)."""
        started = [0.0]
        counts = [self.gc_collections.labels(str(g)) for g in range(3)]
        pauses = [self.gc_pause_seconds.labels(str(g)) for g in range(3)]

        def probe(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                started[0] = time.perf_counter()
            else:
                g = info["generation"]
                counts[g].inc()
                pauses[g].inc(time.perf_counter() - started[0])

        gc.callbacks.append(probe)
        return lambda: gc.callbacks.remove(probe)

    def render(self) -> bytes:
        """The exposition text: this process's metrics, or with several workers the server's."""
        if self._sampler is not None:
            self._sampler.sample(time.monotonic())
        else:
            self.tally.flush()
        return generate_latest(self._scrape)


class Tally:
    """Counter increments and histogram observations made on the event loop, kept as plain
    numbers and added to their prometheus-client children in one go by ``flush``:
    ``Metrics.render`` flushes, and in multiprocess mode so does the periodic sample, so a
    scrape answered by any worker sees them within ``_SAMPLE_EVERY_S``. A prometheus-client
    child takes a lock per call (a histogram also walks its buckets), which costs the hot path
    microseconds per request; here it is a dict update. Event-loop thread only.
    """

    __slots__ = ("_counts", "_observed")

    def __init__(self) -> None:
        self._counts: dict[Any, float] = {}
        self._observed: dict[Any, tuple[list[float], list[int], list[float]]] = {}

    def inc(self, child: Any, amount: float = 1) -> None:
        """``child.inc(amount)``, deferred (``child``: a Counter or its labelled child)."""
        counts = self._counts
        counts[child] = counts.get(child, 0) + amount

    def observe(self, child: Any, value: float) -> None:
        """``child.observe(value)``, deferred (``child``: a Histogram or labelled child)."""
        seen = self._observed.get(child)
        if seen is None:
            bounds = list(child._upper_bounds)
            seen = self._observed[child] = (bounds, [0] * len(bounds), [0.0])
        seen[1][bisect_left(seen[0], value)] += 1  # the first bucket with value <= bound
        seen[2][0] += value

    def flush(self) -> None:
        """Add what was tallied to the children (and so to the multiprocess files)."""
        counts, self._counts = self._counts, {}
        for child, n in counts.items():
            child.inc(n)
        observed, self._observed = self._observed, {}
        for child, (_bounds, buckets, total) in observed.items():
            for i, n in enumerate(buckets):
                if n:
                    child._buckets[i].inc(n)
            child._sum.inc(total[0])


class _Sampler:
    """Multiprocess mode: writes this worker's function-read gauges (the in-flight count among
    them) and its tally into its file, so that a scrape answered by another worker sees them."""

    def __init__(self, tally: Tally) -> None:
        self._tally = tally
        self._functions: dict[Gauge, Callable[[], float]] = {}  # child -> its function
        self._next = 0.0  # monotonic time of the next periodic sample
        self._nonzero = False  # the last sample wrote a non-zero value

    def add(self, child: Gauge, f: Callable[[], float]) -> None:
        self._functions[child] = f

    def discard(self, child: Gauge) -> None:
        self._functions.pop(child, None)

    def in_flight_changed(self, n: int) -> None:
        now = time.monotonic()
        if now >= self._next or (n == 0 and self._nonzero):
            self.sample(now)

    def sample(self, now: float) -> None:
        self._next = now + _SAMPLE_EVERY_S
        self._tally.flush()
        nonzero = False
        for child, f in self._functions.items():
            value = float(f())
            child.set(value)
            nonzero = nonzero or value != 0
        self._nonzero = nonzero


class _SampledGauge:
    """A labelled multiprocess Gauge whose ``set_function`` is sampled by a ``_Sampler``."""

    def __init__(self, gauge: Gauge, sampler: _Sampler) -> None:
        self._gauge = gauge
        self._sampler = sampler

    def labels(self, *labelvalues: str) -> _SampledChild:
        return _SampledChild(self._gauge.labels(*labelvalues), self._sampler)

    def remove(self, *labelvalues: str) -> None:
        self._sampler.discard(self._gauge.labels(*labelvalues))
        self._gauge.remove(*labelvalues)


class _SampledChild:
    """One labelled child: ``set``/``inc``/``dec`` write through; ``set_function`` registers."""

    def __init__(self, child: Gauge, sampler: _Sampler) -> None:
        self._child = child
        self._sampler = sampler

    def set_function(self, f: Callable[[], float]) -> None:
        self._sampler.add(self._child, f)

    def set(self, value: float) -> None:
        self._child.set(value)

    def inc(self, amount: float = 1) -> None:
        self._child.inc(amount)

    def dec(self, amount: float = 1) -> None:
        self._child.dec(amount)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_bytes() -> float:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _open_fds() -> float:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return float("nan")
