"""Adaptive micro-batcher over blocks of rows: blocks that arrive together share one call.

One batcher per loaded model version. A caller submits a *block* (a matrix of rows, all for
the same ``unit`` of work); a dispatch concatenates queued blocks of one unit, oldest first, up
to ``max_batch_size`` rows, and makes one call. Batches form by themselves from load, with no
timer on the idle path:

* when an execution slot is free (``concurrency`` slots), whatever is queued is dispatched by
  a callback scheduled (``call_soon``) at its submit, so the blocks submitted before that
  callback runs share the call: a lone block at low load goes out as it is, without waiting;
* while every slot is busy, blocks accumulate; the next free slot takes up to
  ``max_batch_size`` rows of them; a block larger than that is split on submit;
* ``max_delay_s > 0`` holds a dispatch up to that long for the batch to fill;
* while every slot is busy and a whole batch (``max_batch_size`` rows) is queued, up to
  ``ahead`` more batches are handed to ``start``, to wait for a free slot there (a model
  thread's queue): under load the next call then starts as the previous one ends, rather than
  once the event loop has seen it end.

No task stands between a call and its callers: ``start`` reports a call's outcome to a
callback, which resolves the callers' futures and dispatches what has queued meanwhile in the
same callback. Under load the loop takes milliseconds a step, and every hop through a task of
its own would add one step to each request's wait.

Each submitted block gets its own future, resolved exactly once: with one result per row
(a failing call is retried row by row, so one bad row fails alone, as ``Failure``), or with
``BatcherClosed`` at shutdown. A caller that goes away (cancelled, or its deadline passed)
before its block is dispatched is dropped from the queue; one cancelled while its batch runs is
skipped at fan-out, never breaking it for the others. The batch function runs wherever the
caller's ``start`` puts it (a worker thread, or inline when measured tiny).

Traces (``gateway.tracing``): a block submitted for a sampled request gets a ``batch queue``
span until its dispatch, and its batch's call runs with ``tracing.calls`` naming every sampled
request it serves (the ``model call`` span links to each).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from gateway.tracing import Call, Traced, calls, current, sink

R = TypeVar("R")

__all__ = ["BatcherClosed", "BlockTooLarge", "Failure", "MicroBatcher", "Outcome", "QueueFull"]


class QueueFull(Exception):
    """``max_queue`` rows are waiting already; the block was refused without waiting."""


class BlockTooLarge(ValueError):
    """The block alone holds more rows than the queue may: no retry can succeed."""


class BatcherClosed(Exception):
    """The batcher is shutting down; the block was refused or could not be run in time."""


@dataclass(frozen=True, slots=True)
class Failure:
    """The error one row raised, in place of its result."""

    error: Exception


BatchFn = Callable[[Hashable, np.ndarray], Sequence[R]]
Outcome = Callable[[Any, BaseException | None], None]
"""Told a call's outcome on the event loop: ``(result, None)`` or ``(None, error)``."""
Starter = Callable[[Callable[[Hashable, np.ndarray], Sequence["R | Failure"]], Hashable,
                    np.ndarray, Outcome], Callable[[], None] | None]


@dataclass(eq=False, slots=True)
class _Entry(Generic[R]):
    unit: Hashable  # written once
    rows: np.ndarray  # written once
    future: asyncio.Future[Sequence[R | Failure]]  # resolved exactly once
    queued: bool = True  # True until taken by a dispatch, by shutdown or by its caller leaving
    trace: Traced | None = None  # the submitter's sampled request (written once)
    queued_ns: int = 0  # when it was queued, if traced
    sink: list[Any] | None = None  # where its call's span context goes (``tracing.sink``)


@dataclass(eq=False, slots=True)
class _Running(Generic[R]):
    """A batch handed to ``start`` whose outcome has not been told yet."""

    entries: list[_Entry[R]]
    rows: int
    skip: Callable[[], None] | None = None  # drops the call if it has not started


class MicroBatcher(Generic[R]):
    """Batches ``submit(unit, rows)`` calls into ``fn(unit, stacked_rows)`` calls, which
    return one result per row in order.

    ``start(call, unit, rows, then)`` executes a call (e.g. in a thread, ``Executor.start``)
    and tells ``then(results, None)`` or ``then(None, error)`` on the event loop, at most once
    (before returning, for a call made inline); it returns a function that drops the call if
    it has not started, or None. ``MicroBatcher.call`` is the ``call`` it is given: ``fn``
    with the row-by-row retry. Raises ValueError for limits out of range.
    ``on_batch(rows)`` observes each dispatch (metrics); it runs on the event loop and must not
    block.
    """

    def __init__(
        self,
        fn: BatchFn[R],
        *,
        start: Starter[R],
        max_batch_size: int = 64,
        max_delay_s: float = 0.0,
        max_queue: int = 4096,
        concurrency: int = 1,
        ahead: int = 0,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if not 0.0 <= max_delay_s <= 1.0:
            raise ValueError(f"max_delay_s must be within [0, 1], got {max_delay_s}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if concurrency < 1 or ahead < 0:
            raise ValueError(f"concurrency must be >= 1 and ahead >= 0, got {concurrency} and "
                             f"{ahead}")
        self._fn = fn
        self._start = start
        self._max_batch = max_batch_size
        self._max_delay = max_delay_s
        self._max_queue = max_queue
        self._concurrency = concurrency
        self._ahead = ahead
        self._on_batch = on_batch
        self._queue: deque[_Entry[R]] = deque()
        self.queued_rows = 0  # rows of entries in _queue with queued=True
        self._running: set[_Running[R]] = set()  # handed to ``start``, outcome not told yet
        self.running_rows = 0  # their rows
        self._closed = False
        self._due = False  # a dispatch callback is scheduled (``call_soon``)
        self._dispatching = False  # inside ``_dispatch`` (an inline call ends within it)
        self._fill_timer: asyncio.TimerHandle | None = None  # ``max_delay_s`` running out
        self._filled = False  # ``max_delay_s`` has run out for the batch being formed
        # Set in start(), inside the running loop.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None  # a batch ended or a caller left

    def start(self) -> None:
        """Take rows, on the running loop."""
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()

    @property
    def accepting(self) -> bool:
        """Started and not closed: ``submit`` takes rows."""
        return not self._closed and self._loop is not None

    async def submit(self, unit: Hashable, rows: np.ndarray) -> list[R | Failure]:
        """Queue ``rows`` (one block of one unit) and wait for one result per row.

        Raises:
            BlockTooLarge: the block holds more rows than ``max_queue`` (raised at once).
            QueueFull: the queue has no room for the block now (raised at once).
            BatcherClosed: shutting down.
        """
        loop = self._loop
        if self._closed or loop is None:
            raise BatcherClosed("not accepting rows")
        n = len(rows)
        if n > self._max_queue:
            raise BlockTooLarge(f"{n} uncached rows exceed the queue limit of {self._max_queue}")
        if self.queued_rows + n > self._max_queue:
            raise QueueFull(f"{self.queued_rows} rows queued (limit {self._max_queue})")
        step = self._max_batch
        entries = [_Entry(unit, rows[i:i + step], loop.create_future())
                   for i in range(0, n, step)]
        trace = current.get()
        if trace is not None:
            now, to = time.time_ns(), sink.get()
            for e in entries:
                e.trace, e.queued_ns, e.sink = trace, now, to
        self._queue.extend(entries)
        self.queued_rows += n
        if not self._due:
            self._due = True
            loop.call_soon(self._dispatch)
        try:
            if len(entries) == 1:
                return list(await entries[0].future)
            parts = await asyncio.gather(*(e.future for e in entries))
            return [r for part in parts for r in part]
        finally:
            for e in entries:
                if e.queued:  # left before dispatch: drop the block
                    e.queued = False
                    self.queued_rows -= len(e.rows)
                    if not e.future.done():
                        e.future.cancel()
                    if self._changed is not None:
                        self._changed.set()

    def _dispatch(self) -> None:
        """Hand over every batch due now (see the module docstring); a partial batch waits
        for ``max_delay_s`` first, once."""
        self._due = False
        if self._dispatching:  # (an inline call's end, inside the loop below)
            return
        self._dispatching = True
        try:
            while self._may_hand_over():
                if self._max_delay and self.queued_rows < self._max_batch and not self._filled:
                    if self._fill_timer is None:
                        assert self._loop is not None
                        self._fill_timer = self._loop.call_later(self._max_delay,
                                                                 self._fill_ended)
                    return
                if self._fill_timer is not None:
                    self._fill_timer.cancel()
                    self._fill_timer = None
                self._filled = False
                batch = self._take()
                if batch:
                    self._hand_over(batch)
            if not self.queued_rows:
                self._queue.clear()  # only entries whose callers left remain
        finally:
            self._dispatching = False

    def _fill_ended(self) -> None:
        self._fill_timer = None
        self._filled = True
        self._dispatch()

    def _may_hand_over(self) -> bool:
        """Is a batch to be handed to ``start`` now: rows are queued and a slot is free, or a
        whole batch is queued and fewer than ``ahead`` wait for a slot?"""
        busy = len(self._running)
        return bool(self.queued_rows) and (busy < self._concurrency or (
            busy < self._concurrency + self._ahead and self.queued_rows >= self._max_batch))

    def _take(self) -> list[_Entry[R]]:
        """Oldest live entries of the first live entry's unit, up to ``max_batch_size`` rows."""
        batch: list[_Entry[R]] = []
        size = 0
        queue = self._queue
        while queue:
            entry = queue[0]
            if not entry.queued:
                queue.popleft()
                continue
            if batch and (entry.unit != batch[0].unit or size + len(entry.rows) > self._max_batch):
                break
            queue.popleft()
            entry.queued = False
            self.queued_rows -= len(entry.rows)
            if not entry.future.done():
                batch.append(entry)
                size += len(entry.rows)
                if entry.trace is not None:
                    entry.trace.child("batch queue", entry.queued_ns,
                                      {"gateway.rows": len(entry.rows)})
        return batch

    def _hand_over(self, batch: list[_Entry[R]]) -> None:
        """Start one call for ``batch``; ``_ended`` resolves its entries' futures."""
        rows = batch[0].rows if len(batch) == 1 else np.concatenate([e.rows for e in batch])
        running = _Running(batch, len(rows))
        self._running.add(running)
        self.running_rows += len(rows)
        if self._on_batch is not None:
            self._on_batch(len(rows))
        served = [e.trace for e in batch if e.trace is not None]
        token = calls.set(Call(served, [e.sink for e in batch if e.sink is not None])) \
            if served else None
        try:
            running.skip = self._start(self.call, batch[0].unit, rows,
                                       functools.partial(self._ended, running))
        except BaseException as exc:  # the call could not start: its callers are told
            self._ended(running, None, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            if token is not None:
                calls.reset(token)

    def _ended(self, running: _Running[R], results: Sequence[R | Failure] | None,
               error: BaseException | None) -> None:
        """A call's outcome: its callers' futures resolved, what queued meanwhile dispatched.
        Nothing for a batch given up at shutdown."""
        if running not in self._running:
            return
        self._running.discard(running)
        self.running_rows -= running.rows
        start = 0
        for entry in running.entries:
            if entry.future.done():  # its caller left while the batch ran
                start += len(entry.rows)
            elif error is not None or results is None:
                entry.future.set_exception(BatcherClosed(f"batch interrupted: {error!r}"))
            else:
                end = start + len(entry.rows)
                entry.future.set_result(results[start:end])
                start = end
        if self._changed is not None:
            self._changed.set()
        if self.queued_rows:
            self._dispatch()

    def call(self, unit: Hashable, rows: np.ndarray) -> list[R | Failure]:
        """``fn`` on the whole batch, or row by row if the batch raises."""
        try:
            out = list(self._fn(unit, rows))
            if len(out) != len(rows):
                raise ValueError(f"batch function returned {len(out)} results for {len(rows)}")
            return list(out)
        except Exception as exc:  # re-delivered to each row's caller below
            if len(rows) == 1:
                return [Failure(exc)]
        results: list[R | Failure] = []
        for i in range(len(rows)):
            try:
                results.append(self._fn(unit, rows[i:i + 1])[0])
            except Exception as exc:  # this row's own error, delivered to its caller
                results.append(Failure(exc))
        return results

    async def aclose(self, grace_s: float = 5.0) -> None:
        """Stop intake, let queued and running rows finish within ``grace_s``, then fail the
        rest with BatcherClosed (a call handed to a thread and not started is dropped; one
        running there ends unobserved). Idempotent."""
        self._closed = True
        changed = self._changed
        try:
            async with asyncio.timeout(grace_s):
                while changed is not None and (self.queued_rows or self._running):
                    changed.clear()
                    await changed.wait()
        except TimeoutError:
            pass
        if self._fill_timer is not None:
            self._fill_timer.cancel()
            self._fill_timer = None
        while self._queue:
            entry = self._queue.popleft()
            if entry.queued:
                entry.queued = False
                if not entry.future.done():
                    entry.future.set_exception(BatcherClosed("shut down before dispatch"))
        self.queued_rows = 0
        for running in list(self._running):
            self._running.discard(running)
            self.running_rows -= running.rows
            if running.skip is not None:
                running.skip()
            for entry in running.entries:
                if not entry.future.done():
                    entry.future.set_exception(BatcherClosed("shut down while running"))
