"""Adaptive micro-batcher over blocks of rows: blocks that arrive together share one call.

One dispatcher task per batcher (one batcher per loaded model version). A caller submits a
*block* (a matrix of rows, all for the same ``unit`` of work); the dispatcher concatenates
queued blocks of one unit, oldest first, up to ``max_batch_size`` rows, and makes one call.
Batches form by themselves from load, with no timer on the idle path:

* when an execution slot is free (``concurrency`` slots), whatever is queued is dispatched at
  once: a lone block at low load goes out as it is, without waiting;
* while every slot is busy, blocks accumulate; the next free slot takes up to
  ``max_batch_size`` rows of them; a block larger than that is split on submit;
* ``max_delay_s > 0`` holds a dispatch up to that long for the batch to fill;
* while every slot is busy and a whole batch (``max_batch_size`` rows) is queued, up to
  ``ahead`` more batches are handed to ``run``, to wait for a free slot there (a model thread's
  queue): under load the next call then starts as the previous one ends, rather than once the
  event loop has seen it end.

Each submitted block gets its own future, resolved exactly once: with one result per row
(a failing call is retried row by row, so one bad row fails alone, as ``Failure``), or with
``BatcherClosed`` at shutdown. A caller that goes away (cancelled, or its deadline passed)
before its block is dispatched is dropped from the queue; one cancelled while its batch runs is
skipped at fan-out, never breaking it for the others. The batch function runs wherever the
caller's ``run`` puts it (a worker thread, or inline when measured tiny).

Traces (``gateway.tracing``): a block submitted for a sampled request gets a ``batch queue``
span until its dispatch, and its batch's call runs with ``tracing.calls`` naming every sampled
request it serves (the ``model call`` span links to each).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from gateway.tracing import Call, Traced, calls, current, sink

R = TypeVar("R")

__all__ = ["BatcherClosed", "BlockTooLarge", "Failure", "MicroBatcher", "QueueFull"]


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
Runner = Callable[[BatchFn[R], Hashable, np.ndarray], Awaitable[Sequence["R | Failure"]]]


@dataclass(eq=False, slots=True)
class _Entry(Generic[R]):
    unit: Hashable  # written once
    rows: np.ndarray  # written once
    future: asyncio.Future[Sequence[R | Failure]]  # resolved exactly once
    queued: bool = True  # True until taken by a dispatch, by shutdown or by its caller leaving
    trace: Traced | None = None  # the submitter's sampled request (written once)
    queued_ns: int = 0  # when it was queued, if traced
    sink: list[Any] | None = None  # where its call's span context goes (``tracing.sink``)


class MicroBatcher(Generic[R]):
    """Batches ``submit(unit, rows)`` calls into ``fn(unit, stacked_rows)`` calls, which
    return one result per row in order.

    ``run(call, unit, rows)`` executes a call (e.g. in a thread) and returns its results;
    ``MicroBatcher.call`` is the ``call`` it is given: ``fn`` with the row-by-row retry.
    Raises ValueError for limits out of range. ``on_batch(rows)`` observes each dispatch
    (metrics); it runs on the event loop and must not block.
    """

    def __init__(
        self,
        fn: BatchFn[R],
        *,
        run: Callable[[Callable[[Hashable, np.ndarray], Sequence[R | Failure]], Hashable,
                       np.ndarray], Awaitable[Sequence[R | Failure]]],
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
        self._run = run
        self._max_batch = max_batch_size
        self._max_delay = max_delay_s
        self._max_queue = max_queue
        self._concurrency = concurrency
        self._ahead = ahead
        self._busy = 0  # batches handed to ``run`` and not ended
        self.running_rows = 0  # their rows
        self._on_batch = on_batch
        self._queue: deque[_Entry[R]] = deque()
        self.queued_rows = 0  # rows of entries in _queue with queued=True
        self._running: set[asyncio.Task[None]] = set()
        self._closed = False
        # Created in start(), inside the running loop.
        self._wake: asyncio.Event | None = None
        self._dispatcher: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the dispatcher on the running loop."""
        self._wake = asyncio.Event()
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch_loop())

    @property
    def accepting(self) -> bool:
        """Started and not closed: ``submit`` takes rows."""
        return not self._closed and self._wake is not None

    async def submit(self, unit: Hashable, rows: np.ndarray) -> list[R | Failure]:
        """Queue ``rows`` (one block of one unit) and wait for one result per row.

        Raises:
            BlockTooLarge: the block holds more rows than ``max_queue`` (raised at once).
            QueueFull: the queue has no room for the block now (raised at once).
            BatcherClosed: shutting down.
        """
        if self._closed or self._wake is None:
            raise BatcherClosed("not accepting rows")
        n = len(rows)
        if n > self._max_queue:
            raise BlockTooLarge(f"{n} uncached rows exceed the queue limit of {self._max_queue}")
        if self.queued_rows + n > self._max_queue:
            raise QueueFull(f"{self.queued_rows} rows queued (limit {self._max_queue})")
        loop = asyncio.get_running_loop()
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
        self._wake.set()
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

    async def _dispatch_loop(self) -> None:
        assert self._wake is not None
        while True:
            while not self._may_hand_over():
                if not self.queued_rows:
                    self._queue.clear()  # only entries whose callers left remain
                self._wake.clear()
                await self._wake.wait()
            if self._max_delay and self.queued_rows < self._max_batch:
                await self._fill(time.monotonic() + self._max_delay)
            batch = self._take()
            if not batch:
                continue
            n = sum(len(e.rows) for e in batch)
            self._busy += 1
            self.running_rows += n
            task = asyncio.get_running_loop().create_task(self._execute(batch, n))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _may_hand_over(self) -> bool:
        """Is a batch to be handed to ``run`` now: rows are queued and a slot is free, or a
        whole batch is queued and fewer than ``ahead`` wait for a slot?"""
        busy = self._busy
        return bool(self.queued_rows) and (busy < self._concurrency or (
            busy < self._concurrency + self._ahead and self.queued_rows >= self._max_batch))

    async def _fill(self, deadline: float) -> None:
        assert self._wake is not None
        while self.queued_rows < self._max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wake.wait()
            except TimeoutError:
                return

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

    async def _execute(self, batch: list[_Entry[R]], n: int) -> None:
        """Run ``batch`` (``n`` rows) and resolve its entries' futures."""
        assert self._wake is not None
        try:
            rows = batch[0].rows if len(batch) == 1 else np.concatenate([e.rows for e in batch])
            if self._on_batch is not None:
                self._on_batch(len(rows))
            served = [e.trace for e in batch if e.trace is not None]
            if served:  # (this task's own context)
                calls.set(Call(served, [e.sink for e in batch if e.sink is not None]))
            results = await self._run(self.call, batch[0].unit, rows)
            start = 0
            for entry in batch:
                end = start + len(entry.rows)
                if not entry.future.done():  # its caller may have left while the batch ran
                    entry.future.set_result(results[start:end])
                start = end
        except BaseException:
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(BatcherClosed("batch interrupted"))
            raise
        finally:
            self._busy -= 1
            self.running_rows -= n
            if self.queued_rows:  # (else the dispatcher waits for a submit anyway)
                self._wake.set()

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
        rest with BatcherClosed and stop the dispatcher. Idempotent."""
        self._closed = True
        try:
            async with asyncio.timeout(grace_s):
                while self.queued_rows or self._running:
                    if self._running:
                        await asyncio.wait(set(self._running), return_when="FIRST_COMPLETED")
                    else:
                        await asyncio.sleep(0)  # a free slot: the dispatcher takes the queue
        except TimeoutError:
            pass
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        while self._queue:
            entry = self._queue.popleft()
            if entry.queued:
                entry.queued = False
                if not entry.future.done():
                    entry.future.set_exception(BatcherClosed("shut down before dispatch"))
        self.queued_rows = 0
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
