from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import anyio
import pytest

from gateway.batcher import BatcherClosed, MicroBatcher, QueueFull
from gateway.executor import Executor
from tests.support import wait_for, wait_thread_event

pytestmark = pytest.mark.anyio


class Doubler:
    """Batch function: doubles each item; holds at a gate; fails on negative items."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        self.entered.set()
        self.gate.wait(timeout=30)
        if any(i < 0 for i in items):
            raise ValueError(f"negative in {list(items)}")
        return [2 * i for i in items]


def thread_executor() -> Executor:
    return Executor(limiter=anyio.CapacityLimiter(1), placement="thread")


def make(fn: Doubler, **kw: int) -> MicroBatcher[int, int]:
    b: MicroBatcher[int, int] = MicroBatcher(fn, executor=thread_executor(), **kw)
    b.start()
    return b


async def hold_first(fn: Doubler, b: MicroBatcher[int, int]) -> asyncio.Task[int]:
    """Submit 0 and keep it running at the gate, so later rows accumulate."""
    fn.gate.clear()
    first = asyncio.create_task(b.submit(0))
    await wait_thread_event(fn.entered)
    return first


async def test_lone_row_goes_out_at_once_as_batch_of_one() -> None:
    fn = Doubler()
    b = make(fn)
    assert await b.submit(21) == 42
    assert fn.batches == [[21]]
    await b.aclose()


async def test_rows_accumulate_while_busy_and_dispatch_up_to_max_batch() -> None:
    fn = Doubler()
    b = make(fn, max_batch_size=64)
    first = await hold_first(fn, b)
    tasks = [asyncio.create_task(b.submit(i)) for i in range(1, 256)]
    await wait_for(lambda: b.queued_rows == 255)
    fn.gate.set()
    assert await asyncio.gather(first, *tasks) == [2 * i for i in range(256)]
    assert [len(x) for x in fn.batches] == [1, 64, 64, 64, 63]
    await b.aclose()


async def test_failing_batch_is_retried_row_by_row() -> None:
    fn = Doubler()
    b = make(fn)
    first = await hold_first(fn, b)
    tasks = [asyncio.create_task(b.submit(i)) for i in (1, -1, 2)]
    await wait_for(lambda: b.queued_rows == 3)
    fn.gate.set()
    results = await asyncio.gather(first, *tasks, return_exceptions=True)
    assert results[0] == 0 and results[1] == 2 and results[3] == 4
    assert isinstance(results[2], ValueError)
    assert fn.batches[1:] == [[1, -1, 2], [1], [-1], [2]]
    await b.aclose()


async def test_full_queue_refuses_at_once() -> None:
    fn = Doubler()
    b = make(fn, max_queue=3)
    first = await hold_first(fn, b)
    tasks = [asyncio.create_task(b.submit(i)) for i in (1, 2, 3)]
    await wait_for(lambda: b.queued_rows == 3)
    with pytest.raises(QueueFull):
        await b.submit(4)
    fn.gate.set()
    assert await asyncio.gather(first, *tasks) == [0, 2, 4, 6]
    await b.aclose()


async def test_caller_gone_before_dispatch_is_dropped() -> None:
    fn = Doubler()
    b = make(fn)
    first = await hold_first(fn, b)
    gone = asyncio.create_task(b.submit(1))
    stays = asyncio.create_task(b.submit(2))
    await wait_for(lambda: b.queued_rows == 2)
    gone.cancel()
    await wait_for(lambda: b.queued_rows == 1)
    fn.gate.set()
    assert await asyncio.gather(first, stays) == [0, 4]
    assert fn.batches == [[0], [2]]
    await b.aclose()


async def test_caller_cancelled_while_its_batch_runs_does_not_break_fan_out() -> None:
    fn = Doubler()
    b = make(fn)
    first = await hold_first(fn, b)
    tasks = [asyncio.create_task(b.submit(i)) for i in (1, 2, 3)]
    await wait_for(lambda: b.queued_rows == 3)
    fn.entered.clear()
    fn.gate.set()
    await wait_thread_event(fn.entered)  # batch [1, 2, 3] is in the worker thread
    fn.gate.clear()
    tasks[1].cancel()
    fn.gate.set()
    assert await first == 0
    assert await tasks[0] == 2 and await tasks[2] == 6
    with pytest.raises(asyncio.CancelledError):
        await tasks[1]
    assert await b.submit(5) == 10  # the batcher still works
    await b.aclose()


async def test_shutdown_drains_then_refuses() -> None:
    fn = Doubler()
    b = make(fn)
    first = await hold_first(fn, b)
    queued = asyncio.create_task(b.submit(1))
    await wait_for(lambda: b.queued_rows == 1)
    closing = asyncio.create_task(b.aclose(grace_s=30))
    await asyncio.sleep(0)
    with pytest.raises(BatcherClosed):
        await b.submit(2)
    fn.gate.set()
    await closing
    assert await first == 0 and await queued == 2


async def test_shutdown_fails_leftovers_after_grace() -> None:
    fn = Doubler()
    b = make(fn)
    first = await hold_first(fn, b)
    queued = asyncio.create_task(b.submit(1))
    await wait_for(lambda: b.queued_rows == 1)
    closing = asyncio.create_task(b.aclose(grace_s=0.01))
    with pytest.raises(BatcherClosed):
        await queued
    fn.gate.set()
    await closing
    with pytest.raises(BatcherClosed):
        await first


async def test_max_delay_grows_the_batch() -> None:
    fn = Doubler()
    b = MicroBatcher(fn, executor=thread_executor(), max_batch_size=4, max_delay_s=1.0)
    b.start()
    tasks = [asyncio.create_task(b.submit(i)) for i in range(4)]
    assert await asyncio.gather(*tasks) == [0, 2, 4, 6]
    assert fn.batches == [[0, 1, 2, 3]]  # a full batch leaves before the delay ends
    await b.aclose()


def test_bad_limits_raise() -> None:
    for kw in ({"max_batch_size": 0}, {"max_queue": 0}, {"concurrency": 0},
               {"max_delay_s": -1.0}):
        with pytest.raises(ValueError):
            MicroBatcher(Doubler(), executor=thread_executor(), **kw)  # type: ignore[arg-type]
