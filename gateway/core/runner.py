"""How one model version is called: what a call computes, where it runs, how calls batch.

``ModelRunner`` is the one place that knows a model version's execution: the *units* of work
a request needs (labels and probabilities from one call where the model allows it), the
micro-batcher (if batching), the worker-thread limiter, and the ``Executor`` that runs a call
inline or in a thread. Callers hand it blocks of rows and get back one encoded value per row:
JSON bytes ready to splice into any protocol's answer, ``Failure`` for a row the model
refused. It also judges values read back from a shared cache (``decode_value``).

Where a call runs: a thread hop costs tens of microseconds, and a compiled model answers a
small batch in about as long. ``Executor`` keeps moving averages of the CPU time a call takes on
its own thread (per call and per row, wherever it runs): that is how long an inline call holds
the event loop, and unlike the wall clock it does not count the waits for the GIL of a call in
the thread, nor the moments the process was not scheduled. Garbage collections that start
during a call are not counted either (they are the process's, not the model's). A call runs
inline while it is predicted to take at most ``inline_max_s``, whatever its rows cost each:
handing a call over and taking its answer back costs the loop about what a few hundred trees
cost on a few rows, and the answer comes back only once the thread gets the GIL from a busy
loop, up to Python's switch interval later (5 ms): under a steady load that wait becomes the
requests' tail (docs/performance.md). Until enough calls are measured, and for any dearer
call (a batch under heavy load), it uses the thread, where a library that releases the GIL
computes beside the loop.

The thread is the version's own (``ModelThreads``: ``infer_concurrency`` of them), fed by a
queue: a call handed over while another runs starts the moment that one ends, without waiting
for the event loop to notice the end and hand over the next (the micro-batcher keeps up to
``_AHEAD_BATCHES`` whole batches waiting there). Under load the loop is busy for milliseconds
at a time, and seeing one call end and handing over the next takes it several steps; a model
waiting for it between calls would idle as long as it computes.
A model that slows down moves back to the thread after two slow calls in a row (one alone
may be time the machine took from the process), for its next ``_WAITED_CALLS`` calls. A call
counts in an average as at most ``_OUTLIER`` times the average, and a call of more rows bounds
the cost of a small one: one outlier (a cold cache, a burst of page faults) cannot pin the
averages while the load leaves no small calls to correct them. One that waits on something
other than the CPU (two inline calls in a row longer than ``inline_max_s`` by the wall clock,
over half of it blocked: the thread gave up the CPU, which preemption by other processes does
not count as) goes to the thread for its next ``_WAITED_CALLS`` calls, then is tried inline
again. Under load every call may be a batch; after ``_SMALL_DUE_CALLS`` of them
in a row, a lone row is computed in a call of its own (``Executor.take_small_call``), so the
cost of a lone call, by which the Redis rule judges a lone row, is measured again.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import math
import queue
import resource
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any, Literal, TypeVar

import numpy as np
import orjson

from gateway.core.batcher import (
    BatcherClosed,
    BlockTooLarge,
    Failure,
    MicroBatcher,
    Outcome,
    QueueFull,
)
from gateway.errors import GatewayError, ModelFailed, Overloaded, TooManyRows, Unavailable
from gateway.metrics import Metrics
from gateway.tracing import Attributes, model_call
from model_store import LoadedModel

__all__ = ["Executor", "ModelRunner", "ModelThreads", "Output", "Placement", "SwitchInterval",
           "Unit"]

log = logging.getLogger("gateway.runner")

R = TypeVar("R")

Placement = Literal["auto", "inline", "thread"]
Output = Literal["label", "probabilities"]
Unit = Literal["label", "proba", "both"]
"""What one computation yields per row: the label (or regression value), the probability
vector, or both from one model call."""

SEP = b"\x00"  # between label and probabilities in a ``both`` value (never inside JSON text)

_WARMUP_CALLS = 8  # calls measured in the thread before inline is considered
_ALPHA = 0.2  # weight of the newest call in the moving average
_OUTLIER = 4.0  # a call counts in an average as at most this many times the average
_RECENT_SMALL = 16  # small calls whose least cost is kept (``Executor.least_small_s``)
_WAITED_CALLS = 64  # calls kept in the thread after a model was seen waiting inline
_SMALL_ROWS = 2  # calls of up to this many rows measure the cost of a call itself
_SMALL_DUE_CALLS = 64  # bigger calls in a row after which a lone row is computed alone
_AHEAD_BATCHES = 4  # whole batches waiting in the model thread's queue under load
_PROBA_SUM_TOL = 1e-3
_THREAD_IDLE_S = 30.0  # a model thread with no call for this long ends (started again on demand)


class _GcClock(threading.local):
    """Seconds this thread has spent in garbage collections (a ``gc.callbacks`` probe,
    installed with the first ``Executor``): a collection that happens to start inside a model
    call is not the model's time."""

    seconds = 0.0
    started = 0.0


_gc_clock = _GcClock()


def _gc_probe(phase: str, _info: dict[str, int]) -> None:
    if phase == "start":
        _gc_clock.started = time.perf_counter()
    else:
        _gc_clock.seconds += time.perf_counter() - _gc_clock.started


_RUSAGE_THREAD: int | None = getattr(resource, "RUSAGE_THREAD", None)  # Linux
_calls_seen = itertools.count()


def _blocked_count() -> int:
    """Times this thread has blocked (voluntary context switches: I/O, sleep, a lock, other
    threads), as opposed to being preempted. Where the system does not tell (not Linux),
    every call counts as having blocked: slow by the clock is then taken as waiting."""
    if _RUSAGE_THREAD is None:
        return next(_calls_seen)
    return resource.getrusage(_RUSAGE_THREAD).ru_nvcsw


class _Job:
    """One call handed to a model thread; once it ended, ``done`` runs on the event loop and
    then ``then`` is told its outcome."""

    __slots__ = ("done", "fn", "loop", "rows", "skipped", "then", "unit")

    def __init__(self, fn: Callable[[Hashable, np.ndarray], Any], unit: Hashable,
                 rows: np.ndarray, loop: asyncio.AbstractEventLoop,
                 done: Callable[[], None], then: Outcome) -> None:
        self.fn, self.unit, self.rows, self.loop, self.done = fn, unit, rows, loop, done
        self.then = then
        self.skipped = False  # set on the loop: not to be started

    def skip(self) -> None:
        self.skipped = True


class SwitchInterval:
    """The process's GIL switch interval while calls wait for a model thread.

    A model call in a thread gives up the GIL while the library computes and needs it back to
    return; a busy event loop keeps it until the interval passes (Python's default, 5 ms). While
    calls queue for a model thread, the model is what the load waits for: each call then starts
    with the interval set to ``busy_s``, so the thread takes the GIL back within it. A call
    that starts with nothing queued behind it restores the process's own interval: the loop,
    then the bottleneck, is preempted only by a model that has work waiting. The interval is
    the process's, so the last call to start decides it for all threads."""

    busy_s: float | None = None  # None: the interval is left alone
    idle_s: float = sys.getswitchinterval()

    @classmethod
    def prefer_models(cls, busy_s: float | None) -> None:
        """Take the interval over (``busy_s``), or give it back (None) as it was."""
        if busy_s is not None and cls.busy_s is None:
            cls.idle_s = sys.getswitchinterval()
        elif busy_s is None and cls.busy_s is not None:
            sys.setswitchinterval(cls.idle_s)
        cls.busy_s = busy_s


class ModelThreads:
    """``count`` threads taking a model version's calls in order from one queue, started on
    the first call and ending after ``_THREAD_IDLE_S`` without one (so an unloaded version's
    threads go away by themselves). A call queued while another runs starts as soon as that
    one ends."""

    alive = 0
    """Model threads running in this process now, of every version (changed under
    ``_alive_lock``): while none is, no other thread wants the GIL."""
    _alive_lock = threading.Lock()

    def __init__(self, count: int = 1, *, name: str = "model") -> None:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self._count = count
        self._name = name
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._live = 0  # threads started and not ended

    @property
    def queued(self) -> int:
        """Calls handed over and not started yet."""
        return self._jobs.qsize()

    def start(self, fn: Callable[[Hashable, np.ndarray], R], unit: Hashable,
              rows: np.ndarray, done: Callable[[], None], then: Outcome) -> Callable[[], None]:
        """Queue ``fn(unit, rows)``; when it has ended, ``done()`` and then ``then`` run in
        one callback on the loop, so what ``then`` resolves is seen in the loop's next step.
        Returns a function that skips the call if it has not started (nothing runs then); a
        call that has started runs to its end."""
        job = _Job(fn, unit, rows, asyncio.get_running_loop(), done, then)
        self._jobs.put(job)
        with self._lock:
            if self._live < self._count:
                self._live += 1
                with ModelThreads._alive_lock:
                    ModelThreads.alive += 1
                threading.Thread(target=self._work, name=self._name, daemon=True).start()
        return job.skip

    def _work(self) -> None:
        jobs = self._jobs
        while True:
            try:
                job = jobs.get(timeout=_THREAD_IDLE_S)
            except queue.Empty:
                with self._lock:
                    if jobs.empty():
                        self._live -= 1
                        with ModelThreads._alive_lock:
                            ModelThreads.alive -= 1
                        return
                continue
            if job.skipped:  # its caller left before it started
                continue
            busy_s = SwitchInterval.busy_s
            if busy_s is not None:
                sys.setswitchinterval(busy_s if jobs.qsize() else SwitchInterval.idle_s)
            result: Any = None
            error: BaseException | None = None
            try:
                result = job.fn(job.unit, job.rows)
            except BaseException as exc:  # delivered to the caller
                error = exc
            try:
                job.loop.call_soon_threadsafe(_settle, job, result, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass
            del job, result, error


def _settle(job: _Job, result: Any, error: BaseException | None) -> None:
    try:
        job.done()
    finally:  # the caller gets its answer whatever observing the call did
        job.then(result, error)


class Executor:
    """Runs ``fn(unit, rows)`` inline or on the version's ``ModelThreads`` (``threads`` of them,
    named ``name``); see the module docstring.

    ``on_call(inline, unit, rows, seconds)`` observes each call, failed ones too (metrics;
    wall-clock seconds) on the event loop; it must not block. A call serving sampled requests
    (``gateway.tracing.model_call``) is recorded as a ``model call`` span with
    ``describe(unit)`` among its attributes.
    """

    def __init__(
        self,
        *,
        threads: int = 1,
        name: str = "model",
        placement: Placement = "auto",
        inline_max_s: float = 1e-3,
        on_call: Callable[[bool, Hashable, int, float], None] | None = None,
        describe: Callable[[Hashable], Attributes] | None = None,
    ) -> None:
        if inline_max_s < 0:
            raise ValueError(f"inline_max_s must be >= 0, got {inline_max_s}")
        self._threads = ModelThreads(threads, name=name)
        self._placement = placement
        self._inline_max = inline_max_s
        self._on_call = on_call
        self._describe = describe
        self._calls = 0
        self._per_call_s = 0.0  # moving average of a call's wall-clock seconds
        # CPU seconds, as moving averages: of a call of one or two rows (the model's cost per
        # call, mostly), and of each further row of a bigger call (None: not measured yet).
        self._cpu_small_s: float | None = None
        self._cpu_row_s: float | None = None
        self._recent_small: deque[float] = deque(maxlen=_RECENT_SMALL)  # CPU s, latest calls
        self._least_small: float | None = None  # min(self._recent_small), kept at each call
        self._since_small = 0  # calls of more rows since the last small one (or since taken)
        self._waited = 0  # consecutive inline calls slow by the wall clock, short in CPU time
        self._slow = 0  # consecutive inline calls longer than ``inline_max_s`` in CPU time
        self._thread_only = 0  # calls left in the thread since the model was seen slow
        self._warned = False
        if _gc_probe not in gc.callbacks:
            gc.callbacks.append(_gc_probe)

    @property
    def per_call_s(self) -> float:
        """Moving average of one call's duration (wall clock, where it ran), seconds."""
        return self._per_call_s

    @property
    def queued_calls(self) -> int:
        """Calls handed to the threads that wait for one (not started yet)."""
        return self._threads.queued

    @property
    def measured(self) -> bool:
        """Have enough calls been measured for the averages to mean something?"""
        return self._calls >= _WARMUP_CALLS

    @property
    def least_small_s(self) -> float | None:
        """The least CPU time of the last ``_RECENT_SMALL`` calls of one or two rows (None:
        none yet): what the model costs itself, without the cold caches and contention that a
        loaded machine adds to some calls."""
        return self._least_small

    def take_small_call(self) -> bool:
        """Is a call of one or two rows due? True (once) after ``_SMALL_DUE_CALLS`` calls of
        more rows in a row: a lone row is then computed in a call of its own, so that
        ``least_small_s`` is measured again where a loaded batcher makes no small calls (it
        would otherwise keep the cost of the cold first calls for good)."""
        if self._since_small < _SMALL_DUE_CALLS:
            return False
        self._since_small = 0
        return True

    def predicted_s(self, rows: int) -> float:
        """Predicted CPU time of a call with ``rows`` rows (0 before any measurement): the
        cost of a small call plus the measured cost of each further row; while only small
        calls are measured, each row is assumed to cost a whole small call."""
        small, per_row = self._cpu_small_s, self._cpu_row_s
        if small is None:
            return (per_row or 0.0) * rows
        if rows <= _SMALL_ROWS:
            return small
        return small + (small if per_row is None else per_row) * (rows - _SMALL_ROWS)

    def inline_for(self, rows: int) -> bool:
        """Would a call with ``rows`` rows run inline now?"""
        if self._placement != "auto":
            return self._placement == "inline"
        return (self.measured and not self._thread_only
                and self.predicted_s(rows) <= self._inline_max)

    async def run(self, fn: Callable[[Hashable, np.ndarray], R], unit: Hashable,
                  rows: np.ndarray) -> R:
        """``fn(unit, rows)``, inline or in a model thread. Raises what ``fn`` raises.
        Cancelled, it returns at once: a call that has started in the thread runs to its end
        (and is measured), one that has not is skipped."""
        if self.inline_for(len(rows)):
            return self.run_inline(fn, unit, rows)
        answer: asyncio.Future[R] = asyncio.get_running_loop().create_future()

        def then(result: R, error: BaseException | None) -> None:
            if answer.done():
                return
            if error is None:
                answer.set_result(result)
            else:
                answer.set_exception(error)

        timed, done = self._in_thread(fn, unit, len(rows))
        skip = self._threads.start(timed, unit, rows, done, then)
        try:
            return await answer
        except asyncio.CancelledError:
            skip()
            raise

    def start(self, fn: Callable[[Hashable, np.ndarray], R], unit: Hashable,
              rows: np.ndarray, then: Outcome) -> Callable[[], None] | None:
        """``fn(unit, rows)``, inline or in a model thread, its outcome told to ``then``:
        before this returns for an inline call, else on the loop as the call ends, in the same
        callback (no loop step in between). An error ``fn`` raises goes to ``then``; a
        ``BaseException`` that is not an ``Exception`` (inline) propagates after it. Returns,
        for a call handed to the thread, a function that skips it if it has not started
        (``then`` is never told); None for a call made inline."""
        if not self.inline_for(len(rows)):
            timed, done = self._in_thread(fn, unit, len(rows))
            return self._threads.start(timed, unit, rows, done, then)
        try:
            result = self.run_inline(fn, unit, rows)
        except BaseException as exc:
            then(None, exc)
            if not isinstance(exc, Exception):
                raise
            return None
        then(result, None)
        return None

    def _in_thread(self, fn: Callable[[Hashable, np.ndarray], R], unit: Hashable, rows: int
                   ) -> tuple[Callable[[Hashable, np.ndarray], R], Callable[[], None]]:
        """``fn`` timed for a model thread (the model's own time, without the hop), and the
        ``done`` that observes it on the loop."""
        call = model_call()
        start_ns = time.time_ns() if call is not None else 0
        took = [0.0, 0.0]

        def timed(u: Hashable, x: np.ndarray) -> R:  # the model's own time, without the hop
            start, cpu, gc_s = time.perf_counter(), time.thread_time(), _gc_clock.seconds
            try:
                return fn(u, x)
            finally:
                gc_s = _gc_clock.seconds - gc_s
                took[0] = time.perf_counter() - start - gc_s
                took[1] = time.thread_time() - cpu - gc_s

        def done() -> None:
            self._observe(False, unit, rows, took[0], took[1])
            if call is not None:
                call.record(start_ns, self._span_attributes(unit, rows, "thread"))

        return timed, done

    def run_inline(self, fn: Callable[[Hashable, np.ndarray], R], unit: Hashable,
                   rows: np.ndarray) -> R:
        """``fn(unit, rows)`` on the calling thread, measured. Raises what ``fn`` raises."""
        call = model_call()
        start_ns = time.time_ns() if call is not None else 0
        start, cpu, gc_s = time.perf_counter(), time.thread_time(), _gc_clock.seconds
        switches = _blocked_count()
        try:
            return fn(unit, rows)
        finally:
            gc_s = _gc_clock.seconds - gc_s
            self._observe(True, unit, len(rows), time.perf_counter() - start - gc_s,
                          time.thread_time() - cpu - gc_s,
                          blocked=_blocked_count() != switches)
            if call is not None:
                call.record(start_ns, self._span_attributes(unit, len(rows), "inline"))

    def _span_attributes(self, unit: Hashable, rows: int, placement: str) -> Attributes:
        described = self._describe(unit) if self._describe is not None else {}
        return {**described, "gateway.rows": rows, "gateway.placement": placement}

    def _observe(self, inline: bool, unit: Hashable, rows: int, seconds: float,
                 cpu_s: float, *, blocked: bool = True) -> None:
        self._calls += 1
        self._per_call_s = seconds if self._calls == 1 else (
            self._per_call_s + _ALPHA * (seconds - self._per_call_s))
        cpu_s = max(cpu_s, 0.0)  # less the wall-clock time of a collection: may overshoot
        if rows <= _SMALL_ROWS:
            self._since_small = 0
            self._recent_small.append(cpu_s)
            self._least_small = min(self._recent_small)
            old = self._cpu_small_s
            self._cpu_small_s = cpu_s if not old else old + _ALPHA * (
                min(cpu_s, old * _OUTLIER) - old)
        else:
            self._since_small += 1
            base = self._cpu_small_s
            if base is not None and cpu_s < base:  # a call of more rows costs no less
                base = self._cpu_small_s = cpu_s
            extra = rows if base is None else rows - _SMALL_ROWS
            per_row = (cpu_s - (base or 0.0)) / extra
            old = self._cpu_row_s
            self._cpu_row_s = per_row if not old else old + _ALPHA * (
                min(per_row, old * _OUTLIER) - old)
        if inline and cpu_s > self._inline_max:
            self._slow += 1
            if self._slow >= 2:  # twice in a row is the model, not a moment of the machine's
                self._slow = 0
                self._thread_only = _WAITED_CALLS
        elif inline:
            self._slow = 0
            if seconds > self._inline_max and cpu_s < seconds / 2 and blocked:
                # Mostly waiting, and the thread blocked: the model waited on something
                # (its own threads, I/O, a lock). Twice in a row is no accident.
                self._waited += 1
                if self._waited >= 2:
                    self._waited = 0
                    self._thread_only = _WAITED_CALLS
                    if not self._warned:
                        self._warned = True
                        log.warning("model calls wait on something besides the CPU (%.0f us by "
                                    "the clock, %.0f us of CPU): the worker thread runs them "
                                    "while they do", seconds * 1e6, cpu_s * 1e6)
            else:
                self._waited = 0
        elif not inline and self._thread_only:
            self._thread_only -= 1
        if self._on_call is not None:
            self._on_call(inline, unit, rows, seconds)


class ModelRunner:
    """One loaded model version and everything about calling it; see the module docstring.

    Start with ``start()`` inside the running loop; stop with ``drain(grace_s)``.
    """

    def __init__(
        self,
        model: LoadedModel,
        metrics: Metrics,
        *,
        prefer_compiled: bool = True,
        placement: Placement = "auto",
        inline_max_s: float = 1e-3,
        batching: bool = True,
        max_batch_size: int = 64,
        max_delay_s: float = 0.0,
        max_queue: int = 4096,
        concurrency: int = 1,
        cache_ttl_s: int = 3600,
    ) -> None:
        self.model = model
        self.cache_ttl_s = cache_ttl_s
        self.settings: dict[str, object] = {
            "max_batch_size": max_batch_size, "max_batch_delay_us": round(max_delay_s * 1e6),
            "infer_concurrency": concurrency, "cache_ttl_s": cache_ttl_s,
            "execution": placement, "batching": batching,
        }
        """The settings in force for this version (global ones, overridden by its own); an
        XGBoost or LightGBM model's ``threads`` too."""
        if model.threads is not None:
            self.settings["threads"] = model.threads
        self.manifest = model.manifest
        self.max_batch_size = max_batch_size
        self.prefer_compiled = prefer_compiled
        self.backends: dict[str, str] = dict(model.backends(prefer_compiled=prefer_compiled))
        self.has_proba = model.has_proba
        self._one_call = model.both_in_one_call(prefer_compiled=prefer_compiled)
        self._max_queue = max_queue
        self._unbatched_rows = 0  # rows in calls made without the batcher (batching off)
        name, version = model.name, str(model.version)
        model_calls = metrics.model_calls.labels(name, version)
        model_rows = metrics.model_rows.labels(name, version)
        self._batch_rows = metrics.batch_rows
        inline_calls = metrics.model_exec.labels(name, version, "inline")
        thread_calls = metrics.model_exec.labels(name, version, "thread")
        call_seconds = metrics.model_call_seconds.labels(name, version)

        tally = metrics.tally
        both_calls = 1 if self._one_call else 2

        def on_call(inline: bool, unit: Hashable, rows: int, _seconds: float) -> None:
            tally.inc(inline_calls if inline else thread_calls)
            tally.inc(model_calls, both_calls if unit == "both" else 1)
            tally.inc(model_rows, rows)
            call_seconds.set(self.executor.per_call_s)

        def describe(unit: Hashable) -> Attributes:
            return {"gateway.model": name, "gateway.model.version": version,
                    "gateway.unit": self.unit_tag(unit)}  # type: ignore[arg-type]

        self.executor = Executor(threads=concurrency, name=f"model {name} v{version}",
                                 placement=placement, inline_max_s=inline_max_s,
                                 on_call=on_call, describe=describe)
        self.batcher: MicroBatcher[bytes] | None = None
        if batching:
            self.batcher = MicroBatcher(
                self._call, start=self.executor.start, max_batch_size=max_batch_size,
                max_delay_s=max_delay_s, max_queue=max_queue, concurrency=concurrency,
                ahead=_AHEAD_BATCHES,
                on_batch=lambda n: tally.observe(metrics.batch_rows, n),
            )
            batcher = self.batcher
            metrics.queue_rows.labels(f"{name}:{version}").set_function(
                lambda: batcher.queued_rows)
        self._metrics = metrics
        # Label values of a classifier, as their JSON text: what a cached label may be.
        self._labels = frozenset(orjson.dumps(c) for c in self.manifest.classes)
        self._n_classes = len(self.manifest.classes)

    def start(self) -> None:
        if self.batcher is not None:
            self.batcher.start()

    async def drain(self, grace_s: float) -> None:
        """Let queued and running calls finish within ``grace_s``; fail the rest (503)."""
        if self.batcher is not None:
            await self.batcher.aclose(grace_s)

    def close(self) -> None:
        """Forget this version's metric children (its queue gauge); after ``drain``."""
        if self.batcher is not None:
            label = f"{self.manifest.name}:{self.manifest.version}"
            try:
                self._metrics.queue_rows.remove(label)
            except KeyError:
                pass

    # -- what a request needs ------------------------------------------------------------------
    def units(self, outputs: frozenset[Output]) -> list[Unit]:
        """The units of work answering ``outputs``: one per model call a miss costs. Where
        one call gives labels and probabilities, every request computes (and caches) both,
        so a later request for either is a hit."""
        if self._one_call:
            return ["both"]
        if "probabilities" not in outputs:
            return ["label"]
        if "label" not in outputs:
            return ["proba"]
        return ["label", "proba"]

    def unit_tag(self, unit: Unit) -> str:
        """The unit and the backend(s) computing it, for cache keys."""
        if unit == "label":
            return f"label@{self.backends['label']}"
        if unit == "proba":
            return f"proba@{self.backends['probabilities']}"
        return f"both@{self.backends['label']}+{self.backends['probabilities']}"

    # -- calling the model ---------------------------------------------------------------------
    def try_inline(self, unit: Unit, rows: np.ndarray) -> list[bytes] | None:
        """Answer ``rows`` with one call on the spot, once the caller has found that call
        measured to be tiny (``executor.inline_for``: a call of fewer rows is then tiny too).
        A call that raises answers None, so the batcher's row-by-row retry isolates the bad
        row."""
        try:
            out = self.executor.run_inline(self._call, unit, rows)
        except Exception:  # one bad row: the batcher path retries row by row
            return None
        self._metrics.tally.observe(self._batch_rows, len(rows))
        return list(out)

    async def compute(self, unit: Unit, rows: np.ndarray) -> list[bytes | Failure]:
        """One encoded value per row, computed through the batcher (or one call per row when
        batching is off). A lone row is computed in a call of its own instead when one is due
        (``Executor.take_small_call``).

        Raises:
            Overloaded: the queue has no room now (503, retry).
            TooManyRows: the block alone exceeds the queue limit (413, no retry helps).
            Unavailable: shutting down.
        """
        try:
            if self.batcher is not None:
                if (len(rows) == 1 and self.batcher.accepting
                        and self.executor.take_small_call()):
                    return [await self._one_row(unit, rows)]  # measures a lone call again
                return await self.batcher.submit(unit, rows)
            return await self._compute_unbatched(unit, rows)
        except QueueFull as exc:
            raise Overloaded(f"model {self._label()}: {exc}") from exc
        except BlockTooLarge as exc:
            raise _too_many(self._label(), exc) from exc
        except BatcherClosed as exc:
            raise Unavailable(f"shutting down: {exc}", code="shutting_down") from exc

    async def _compute_unbatched(self, unit: Unit, rows: np.ndarray) -> list[bytes | Failure]:
        n = len(rows)
        if n > self._max_queue:
            raise BlockTooLarge(f"{n} uncached rows exceed the queue limit of {self._max_queue}")
        if self._unbatched_rows + n > self._max_queue:
            raise QueueFull(f"{self._unbatched_rows} rows queued (limit {self._max_queue})")
        self._unbatched_rows += n
        try:
            if n == 1:
                return [await self._one_row(unit, rows)]
            return list(await asyncio.gather(*(self._one_row(unit, rows[i:i + 1])
                                               for i in range(n))))
        finally:
            self._unbatched_rows -= n

    async def _one_row(self, unit: Unit, row: np.ndarray) -> bytes | Failure:
        self._metrics.tally.observe(self._batch_rows, 1)
        try:
            (value,) = await self.executor.run(self._call, unit, row)
        except Exception as exc:  # this row's own error, delivered to its caller
            return Failure(exc)
        return value

    def _call(self, unit: Hashable, rows: np.ndarray) -> list[bytes]:
        """The model on ``rows``: one JSON value per row. Raises what the model raises."""
        dumps = orjson.dumps
        if unit == "label":
            labels = self._predict(rows)
            return [dumps(v) for v in labels]
        if unit == "proba":
            probs = self._predict_proba(rows)
            return [dumps(p) for p in probs]
        labels, probs = self.model.predict_both(rows, prefer_compiled=self.prefer_compiled)
        return [dumps(v) + SEP + dumps(p) for v, p in zip(labels, probs, strict=True)]

    def _predict(self, rows: np.ndarray) -> list[Any]:
        out: list[Any] = self.model.predict(rows, prefer_compiled=self.prefer_compiled)
        return out

    def _predict_proba(self, rows: np.ndarray) -> list[list[float]]:
        out: list[list[float]] = self.model.predict_proba(
            rows, prefer_compiled=self.prefer_compiled)
        return out

    def _label(self) -> str:
        return f"{self.manifest.name} v{self.manifest.version}"

    def failed(self, failure: Failure) -> GatewayError:
        """The error a request gets for a row the model refused (logged)."""
        log.warning("model %s raised %r", self._label(), failure.error)
        return ModelFailed(
            f"model {self._label()} failed on this input ({type(failure.error).__name__})")

    # -- values read back from a shared cache --------------------------------------------------
    def decode_value(self, unit: Unit, value: bytes) -> bytes | None:
        """``value`` re-encoded canonically if it is a valid answer of this model for
        ``unit`` (a label of the model, a finite regression value, a probability vector of the
        model's length summing to ~1), else None."""
        try:
            if unit == "both":
                label, sep, proba = value.partition(SEP)
                if not sep:
                    return None
                a, b = self._valid_label(label), self._valid_proba(proba)
                return None if a is None or b is None else a + SEP + b
            if unit == "label":
                return self._valid_label(value)
            return self._valid_proba(value)
        except (orjson.JSONDecodeError, TypeError, ValueError):
            return None

    def _valid_label(self, raw: bytes) -> bytes | None:
        v = orjson.loads(raw)
        if self.manifest.task == "regression":
            if type(v) not in (int, float) or not math.isfinite(v):
                return None
            return orjson.dumps(v)
        out = orjson.dumps(v)
        return out if out in self._labels and type(v) is not bool else None

    def _valid_proba(self, raw: bytes) -> bytes | None:
        v = orjson.loads(raw)
        if not isinstance(v, list) or len(v) != self._n_classes:
            return None
        if not all(type(p) in (int, float) and math.isfinite(p) and -1e-9 <= p <= 1 + 1e-9
                   for p in v):
            return None
        if abs(math.fsum(v) - 1.0) > _PROBA_SUM_TOL:
            return None
        return orjson.dumps(v)


def _too_many(model: str, exc: Exception) -> TooManyRows:
    return TooManyRows(f"model {model}: {exc} (GATEWAY_MAX_QUEUE_ROWS); send fewer rows",
                       code="too_many_uncached_rows")

