"""Adaptive micro-batcher: distinct rows that arrive together share one model call.

One dispatcher task per batcher (one batcher per loaded model version). Batches form by
themselves from load, with no timer on the idle path:

* when an execution slot is free (``concurrency`` slots), whatever is queued is dispatched at
  once: a lone row at low load goes out as a batch of one, without waiting;
* while every slot is busy, rows accumulate; the next free slot takes up to
  ``max_batch_size`` of them, oldest first;
* ``max_delay_s > 0`` holds a dispatch up to that long for the batch to fill.

Each ``submit`` gets its own future, resolved exactly once: with the row's result, with the
row's own error (a failing batch is retried row by row in the same call, so one bad row fails
alone), or with ``BatcherClosed`` at shutdown. A caller that goes away (cancelled, or its
deadline passed) before its row is dispatched is dropped from the queue; one cancelled while its
batch runs is skipped at fan-out, never breaking it for the others. The batch function runs
where the ``Executor`` puts it: a worker thread, or inline when it is measured to be tiny.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from gateway.executor import Executor

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["BatcherClosed", "MicroBatcher", "QueueFull"]


class QueueFull(Exception):
    """The queue holds ``max_queue`` rows already; the row was refused without waiting."""


class BatcherClosed(Exception):
    """The batcher is shutting down; the row was refused or could not be run in time."""


@dataclass(eq=False, slots=True)
class _Entry(Generic[T, R]):
    item: T  # written once
    future: asyncio.Future[R]  # resolved exactly once, by fan-out, shutdown or cancellation
    queued: bool = True  # True until taken by a dispatch, by shutdown or by its caller leaving


@dataclass(frozen=True, slots=True)
class _Failure:
    error: Exception


class MicroBatcher(Generic[T, R]):
    """Batches ``submit(item)`` calls into ``fn(items) -> results`` calls (same length/order).

    Raises ValueError for limits out of range. ``on_batch(rows)`` is an optional observer
    (metrics); it runs on the event loop and must not block.
    """

    def __init__(
        self,
        fn: Callable[[Sequence[T]], Sequence[R]],
        *,
        executor: Executor,
        max_batch_size: int = 64,
        max_delay_s: float = 0.0,
        max_queue: int = 4096,
        concurrency: int = 1,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if not 0.0 <= max_delay_s <= 1.0:
            raise ValueError(f"max_delay_s must be within [0, 1], got {max_delay_s}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self._fn = fn
        self._executor = executor
        self._max_batch = max_batch_size
        self._max_delay = max_delay_s
        self._max_queue = max_queue
        self._concurrency = concurrency
        self._on_batch = on_batch
        self._queue: deque[_Entry[T, R]] = deque()
        self._queued = 0  # entries in _queue with queued=True
        self._running: set[asyncio.Task[None]] = set()
        self._closed = False
        # Created in start(), inside the running loop.
        self._wake: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._dispatcher: asyncio.Task[None] | None = None

    @property
    def queued_rows(self) -> int:
        return self._queued

    def start(self) -> None:
        """Start the dispatcher on the running loop."""
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(self._concurrency)
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch_loop())

    async def submit(self, item: T) -> R:
        """Queue ``item`` and wait for its result.

        Raises:
            QueueFull: ``max_queue`` rows are waiting already (raised at once).
            BatcherClosed: shutting down.
            Exception: whatever ``fn`` raised for this item alone.
        """
        if self._closed or self._wake is None:
            raise BatcherClosed("not accepting rows")
        if self._queued >= self._max_queue:
            raise QueueFull(f"{self._queued} rows queued (limit {self._max_queue})")
        entry: _Entry[T, R] = _Entry(item, asyncio.get_running_loop().create_future())
        self._queue.append(entry)
        self._set_queued(self._queued + 1)
        self._wake.set()
        try:
            return await entry.future
        finally:
            if entry.queued:  # left before dispatch: drop the row
                entry.queued = False
                self._set_queued(self._queued - 1)

    def _set_queued(self, n: int) -> None:
        self._queued = n

    async def _dispatch_loop(self) -> None:
        assert self._wake is not None and self._slots is not None
        while True:
            while not self._queued:
                self._queue.clear()  # only entries whose callers left remain
                self._wake.clear()
                await self._wake.wait()
            await self._slots.acquire()
            if self._max_delay and self._queued < self._max_batch:
                await self._fill(time.monotonic() + self._max_delay)
            batch = self._take()
            if not batch:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _fill(self, deadline: float) -> None:
        assert self._wake is not None
        while self._queued < self._max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wake.wait()
            except TimeoutError:
                return

    def _take(self) -> list[_Entry[T, R]]:
        batch: list[_Entry[T, R]] = []
        while self._queue and len(batch) < self._max_batch:
            entry = self._queue.popleft()
            if not entry.queued:
                continue
            entry.queued = False
            self._set_queued(self._queued - 1)
            if not entry.future.done():
                batch.append(entry)
        return batch

    async def _execute(self, batch: list[_Entry[T, R]]) -> None:
        assert self._slots is not None
        try:
            if self._on_batch is not None:
                self._on_batch(len(batch))
            items = [e.item for e in batch]
            results = await self._executor.run(self._run, items)
            for entry, result in zip(batch, results, strict=True):
                if entry.future.done():  # its caller left while the batch ran
                    continue
                if isinstance(result, _Failure):
                    entry.future.set_exception(result.error)
                else:
                    entry.future.set_result(result)
        except BaseException:
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(BatcherClosed("batch interrupted"))
            raise
        finally:
            self._slots.release()

    def _run(self, items: Sequence[T]) -> list[R | _Failure]:
        """The whole batch, or row by row if the batch raises."""
        try:
            out = list(self._fn(items))
            if len(out) != len(items):
                raise ValueError(f"batch function returned {len(out)} results for {len(items)}")
            return list(out)
        except Exception as exc:  # re-delivered to each row's caller below
            if len(items) == 1:
                return [_Failure(exc)]
        results: list[R | _Failure] = []
        for item in items:
            try:
                results.append(self._fn([item])[0])
            except Exception as exc:  # this row's own error, delivered to its caller
                results.append(_Failure(exc))
        return results

    async def aclose(self, grace_s: float = 5.0) -> None:
        """Stop intake, let queued and running rows finish within ``grace_s``, then fail the
        rest with BatcherClosed and stop the dispatcher."""
        self._closed = True
        try:
            async with asyncio.timeout(grace_s):
                while self._queued or self._running:
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
        self._set_queued(0)
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
