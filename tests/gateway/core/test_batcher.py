from __future__ import annotations

import asyncio
import threading
from collections.abc import Hashable
from typing import Any

import numpy as np
import pytest

from gateway.core.batcher import BatcherClosed, BlockTooLarge, Failure, MicroBatcher, QueueFull
from gateway.core.runner import Executor
from tests.support import LoopSteps, wait_for, wait_thread_event

pytestmark = pytest.mark.anyio


class Doubler:
    """Batch function: doubles each row's value; holds at a gate; fails on negative rows."""

    def __init__(self) -> None:
        self.batches: list[tuple[Hashable, list[float]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.permits: threading.Semaphore | None = None  # if set, each call takes one

    def __call__(self, unit: Hashable, rows: np.ndarray) -> list[float]:
        values = rows[:, 0].tolist()
        self.batches.append((unit, values))
        self.entered.set()
        if self.permits is not None:
            self.permits.acquire(timeout=30)
        else:
            self.gate.wait(timeout=30)
        if any(v < 0 for v in values):
            raise ValueError(f"negative in {values}")
        return [2 * v for v in values]

    def sizes(self) -> list[int]:
        return [len(values) for _, values in self.batches]


def make(fn: Doubler, ex: Executor | None = None, **kw: Any) -> MicroBatcher[float]:
    """A started batcher of ``fn`` whose calls run on ``ex`` (default: a thread's)."""
    ex = ex or Executor(placement="thread")
    b: MicroBatcher[float] = MicroBatcher(fn, start=ex.start, **kw)
    b.start()
    return b


async def submit(b: MicroBatcher[float], *values: float, unit: str = "u") -> list[Any]:
    """Submit one block; each row's result, or its error."""
    out = await b.submit(unit, np.array(values, dtype=float).reshape(-1, 1))
    return [r.error if isinstance(r, Failure) else r for r in out]


async def hold_first(fn: Doubler, b: MicroBatcher[float]) -> asyncio.Task[list[Any]]:
    """Submit [0] and keep it running at the gate, so later blocks accumulate."""
    fn.gate.clear()
    first = asyncio.create_task(submit(b, 0))
    await wait_thread_event(fn.entered)
    return first


async def test_lone_block_goes_out_at_once_as_it_is() -> None:
    fn = Doubler()
    b = make(fn)
    assert await submit(b, 21, 1) == [42, 2]
    assert fn.batches == [("u", [21, 1])]
    await b.aclose()


async def test_blocks_accumulate_while_busy_and_dispatch_up_to_max_batch() -> None:
    fn = Doubler()
    b = make(fn, max_batch_size=64)
    first = await hold_first(fn, b)
    tasks = [asyncio.create_task(submit(b, *range(i * 10, i * 10 + 10))) for i in range(1, 14)]
    await wait_for(lambda: b.queued_rows == 130)
    fn.gate.set()
    results = await asyncio.gather(first, *tasks)
    assert results[0] == [0]
    assert [r for block in results[1:] for r in block] == [2 * v for v in range(10, 140)]
    assert fn.sizes() == [1, 60, 60, 10]  # whole blocks only, oldest first
    await b.aclose()


async def test_block_larger_than_a_batch_is_split_and_answered_in_order() -> None:
    fn = Doubler()
    b = make(fn, max_batch_size=64)
    assert await submit(b, *range(150)) == [2 * v for v in range(150)]
    assert sorted(fn.sizes()) == [22, 64, 64]
    await b.aclose()


async def test_units_never_share_a_batch() -> None:
    fn = Doubler()
    b = make(fn)
    first = await hold_first(fn, b)
    tasks = [asyncio.create_task(submit(b, i, unit=u)) for i, u in ((1, "a"), (2, "b"), (3, "a"))]
    await wait_for(lambda: b.queued_rows == 3)
    fn.gate.set()
    assert await asyncio.gather(first, *tasks) == [[0], [2], [4], [6]]
    assert fn.batches[1:] == [("a", [1]), ("b", [2]), ("a", [3])]
    await b.aclose()


async def test_failing_batch_is_retried_row_by_row() -> None:
    fn = Doubler()
    b = make(fn)
    first = await hold_first(fn, b)
    mixed = asyncio.create_task(submit(b, 1, -1))
    other = asyncio.create_task(submit(b, 2))
    await wait_for(lambda: b.queued_rows == 3)
    fn.gate.set()
    assert await first == [0]
    one, bad = await mixed
    assert one == 2 and isinstance(bad, ValueError)
    assert await other == [4]
    assert [v for _, v in fn.batches[1:]] == [[1, -1, 2], [1], [-1], [2]]
    await b.aclose()


async def test_full_queue_refuses_at_once_and_an_oversized_block_is_told_apart() -> None:
    fn = Doubler()
    b = make(fn, max_queue=3)
    first = await hold_first(fn, b)
    queued = asyncio.create_task(submit(b, 1, 2))
    await wait_for(lambda: b.queued_rows == 2)
    with pytest.raises(QueueFull):
        await submit(b, 3, 4)
    with pytest.raises(BlockTooLarge):
        await submit(b, 1, 2, 3, 4)
    fits = asyncio.create_task(submit(b, 5))
    await wait_for(lambda: b.queued_rows == 3)
    fn.gate.set()
    assert await asyncio.gather(first, queued, fits) == [[0], [2, 4], [10]]
    await b.aclose()


async def test_caller_gone_before_dispatch_is_dropped() -> None:
    fn = Doubler()
    b = make(fn)
    first = await hold_first(fn, b)
    gone = asyncio.create_task(submit(b, 1, 3))
    stays = asyncio.create_task(submit(b, 2))
    await wait_for(lambda: b.queued_rows == 3)
    gone.cancel()
    await wait_for(lambda: b.queued_rows == 1)
    fn.gate.set()
    assert await asyncio.gather(first, stays) == [[0], [4]]
    assert [v for _, v in fn.batches] == [[0], [2]]
    await b.aclose()


async def test_caller_cancelled_while_its_batch_runs_does_not_break_fan_out() -> None:
    fn = Doubler()
    fn.permits = threading.Semaphore(0)
    b = make(fn)
    first = asyncio.create_task(submit(b, 0))
    await wait_thread_event(fn.entered)
    tasks = [asyncio.create_task(submit(b, i)) for i in (1, 2, 3)]
    await wait_for(lambda: b.queued_rows == 3)
    fn.permits.release()  # the first batch ends; [1, 2, 3] enters and waits for a permit
    assert await first == [0]
    await wait_for(lambda: len(fn.batches) == 2)
    tasks[1].cancel()
    await wait_for(lambda: tasks[1].done())
    fn.permits.release(10)  # this batch and the next
    assert await tasks[0] == [2] and await tasks[2] == [6]
    with pytest.raises(asyncio.CancelledError):
        await tasks[1]
    assert await submit(b, 5) == [10]  # the batcher still works
    await b.aclose()


async def test_shutdown_drains_then_refuses() -> None:
    fn = Doubler()
    b = make(fn)
    first = await hold_first(fn, b)
    queued = asyncio.create_task(submit(b, 1))
    await wait_for(lambda: b.queued_rows == 1)
    closing = asyncio.create_task(b.aclose(grace_s=30))
    await wait_for(lambda: b._closed)
    with pytest.raises(BatcherClosed):
        await submit(b, 2)
    fn.gate.set()
    await closing
    assert await first == [0] and await queued == [2]


async def test_shutdown_fails_leftovers_after_grace() -> None:
    fn = Doubler()
    b = make(fn)
    first = await hold_first(fn, b)
    queued = asyncio.create_task(submit(b, 1))
    await wait_for(lambda: b.queued_rows == 1)
    closing = asyncio.create_task(b.aclose(grace_s=0.01))
    with pytest.raises(BatcherClosed):
        await queued
    fn.gate.set()
    await closing
    with pytest.raises(BatcherClosed):
        await first


async def test_a_batch_handed_ahead_and_not_started_is_dropped_at_shutdown() -> None:
    fn = Doubler()
    ex = Executor(placement="thread")
    b = make(fn, ex, max_batch_size=2, ahead=1)
    first = await hold_first(fn, b)
    ahead = asyncio.create_task(submit(b, 1, 2))
    await wait_for(lambda: b.running_rows == 3)  # handed to the model's thread, behind first
    await b.aclose(grace_s=0)
    for task in (first, ahead):
        with pytest.raises(BatcherClosed):
            await task
    fn.gate.set()
    assert await ex.run(fn, "u", np.array([[9.0]])) == [18.0]  # the thread took its queue
    assert fn.sizes() == [1, 1]  # first and the last call: the batch ahead never ran


async def test_max_delay_grows_the_batch() -> None:
    fn = Doubler()
    b = make(fn, max_batch_size=4, max_delay_s=1.0)
    tasks = [asyncio.create_task(submit(b, i)) for i in range(4)]
    assert await asyncio.gather(*tasks) == [[0], [2], [4], [6]]
    assert fn.batches == [("u", [0, 1, 2, 3])]  # a full batch leaves before the delay ends
    await b.aclose()


def test_bad_limits_raise() -> None:
    for kw in ({"max_batch_size": 0}, {"max_queue": 0}, {"concurrency": 0},
               {"max_delay_s": -1.0}):
        with pytest.raises(ValueError):
            make(Doubler(), **kw)


async def test_a_whole_batch_is_handed_ahead_while_the_slot_is_busy_a_partial_one_is_not() -> None:
    fn = Doubler()
    ex = Executor(placement="thread")
    b = make(fn, ex, max_batch_size=4, ahead=1)
    first = await hold_first(fn, b)
    partial = asyncio.create_task(submit(b, 1, 2, 3))
    await wait_for(lambda: b.queued_rows == 3)
    assert b.running_rows == 1  # three rows are not a batch: they wait in the queue
    whole = asyncio.create_task(submit(b, 4))
    await wait_for(lambda: b.running_rows == 5)  # four are: handed to the model's thread
    assert b.queued_rows == 0 and fn.sizes() == [1]
    late = asyncio.create_task(submit(b, 5, 6, 7, 8))
    await wait_for(lambda: b.queued_rows == 4)
    assert b.running_rows == 5  # one batch ahead at most
    fn.gate.set()
    answers = [await t for t in (first, partial, whole, late)]
    assert answers == [[0], [2, 4, 6], [8], [10, 12, 14, 16]]
    assert fn.sizes() == [1, 4, 4]
    with pytest.raises(ValueError, match="ahead"):
        MicroBatcher(fn, start=ex.start, ahead=-1)
    await b.aclose()


async def test_an_inline_call_answers_its_caller_two_loop_steps_after_the_submit() -> None:
    """The dispatch runs in the step after the submit (blocks of one step share it) and the
    caller resumes in the next: no task of the batcher's stands in between."""
    fn = Doubler()
    b = make(fn, Executor(placement="inline"))
    assert await submit(b, 0.0) == [0.0]  # (the batcher idle again, as under a steady load)
    steps = LoopSteps().start()
    try:
        before = steps.now
        assert await submit(b, 1.0) == [2.0]
        assert steps.now - before <= 2
    finally:
        steps.stop()
        await b.aclose()


async def test_a_call_in_the_thread_answers_its_caller_in_the_step_after_it_ended() -> None:
    """The call's end is seen in one callback on the loop (``on_call`` observes it there),
    which resolves the caller's future: the caller resumes in the next step."""
    steps = LoopSteps()
    ended: list[int] = []
    ex = Executor(placement="thread", on_call=lambda *_: ended.append(steps.now))
    fn = Doubler()
    b = make(fn, ex)
    steps.start()
    try:
        assert await submit(b, 1.0, 2.0) == [2.0, 4.0]
        assert len(ended) == 1 and steps.now - ended[0] <= 1
    finally:
        steps.stop()
        await b.aclose()
