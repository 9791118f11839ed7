"""Inline vs worker-thread placement of model calls."""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
import time
from collections.abc import Hashable

import anyio
import numpy as np
import pytest

from gateway.core.runner import (
    _OUTLIER,
    _SMALL_DUE_CALLS,
    _WAITED_CALLS,
    Executor,
    ModelThreads,
    SwitchInterval,
)
from tests.support import wait_for

pytestmark = pytest.mark.anyio


class Recorder:
    """A model that computes for ``seconds`` of CPU time per call (``sleeps``: waits instead,
    as a model waiting on its own threads or on I/O does)."""

    def __init__(self, seconds: float = 0.0, *, sleeps: bool = False,
                 per_row: float = 0.0) -> None:
        self.seconds = seconds
        self.sleeps = sleeps
        self.per_row = per_row  # CPU seconds of each row beyond the first
        self.threads: list[int] = []

    def __call__(self, _unit: Hashable, rows: np.ndarray) -> list[float]:
        self.threads.append(threading.get_ident())
        if self.seconds and self.sleeps:
            time.sleep(self.seconds)  # the model's own waiting, not a test wait
        elif self.seconds or self.per_row:
            end = time.thread_time() + self.seconds + self.per_row * (len(rows) - 1)
            while time.thread_time() < end:  # the model's own work
                pass
        return rows[:, 0].tolist()


def rows(*values: float) -> np.ndarray:
    return np.array(values, dtype=float).reshape(-1, 1)


async def test_tiny_calls_move_inline_after_warmup() -> None:
    fn = Recorder()
    places: list[bool] = []
    ex = Executor(inline_max_s=0.01,
                  on_call=lambda inline, *_: places.append(inline))
    for _ in range(20):
        assert await ex.run(fn, "u", rows(1, 2)) == [1, 2]
    assert places[:8] == [False] * 8 and all(places[8:])
    assert fn.threads[-1] == threading.get_ident()


async def test_slow_model_never_runs_inline() -> None:
    fn = Recorder(seconds=0.002)
    places: list[bool] = []
    ex = Executor(inline_max_s=100e-6,
                  on_call=lambda inline, *_: places.append(inline))
    for _ in range(30):
        await ex.run(fn, "u", rows(1))
    assert not any(places)
    assert threading.get_ident() not in fn.threads


async def test_a_call_within_the_limit_runs_inline_whatever_its_rows_cost() -> None:
    """Calls of several rows of a model dear per row (a large forest: here 40 µs a row) run
    inline while predicted within ``inline_max_s``; a call predicted beyond it, in the thread."""
    fn = Recorder(per_row=40e-6)
    places: list[bool] = []
    ex = Executor(inline_max_s=0.001, on_call=lambda inline, *_: places.append(inline))
    for _ in range(10):
        await ex.run(fn, "u", rows(1))
        await ex.run(fn, "u", rows(*range(8)))
    assert ex.measured and ex.predicted_s(8) < 0.001 < ex.predicted_s(64)
    assert places[-10:] == [True] * 10
    assert ex.inline_for(8) and not ex.inline_for(64)
    await ex.run(fn, "u", rows(*range(64)))
    assert places[-1] is False


async def test_model_that_slows_down_goes_back_to_the_thread() -> None:
    """Two inline calls in a row dearer than ``inline_max_s`` in CPU time send the model to
    the thread; one alone, between ordinary calls, does not (time the machine took)."""
    fn = Recorder()
    places: list[bool] = []
    ex = Executor(inline_max_s=0.001,
                  on_call=lambda inline, *_: places.append(inline))
    for _ in range(10):
        await ex.run(fn, "u", rows(1))
    assert places[-1] is True
    fn.seconds = 0.005
    await ex.run(fn, "u", rows(1))  # one slow inline call
    fn.seconds = 0.0
    await ex.run(fn, "u", rows(1))
    assert places[-2:] == [True, True] and ex.inline_for(1)
    fn.seconds = 0.005
    await ex.run(fn, "u", rows(1))  # two in a row
    await ex.run(fn, "u", rows(1))
    assert places[-2:] == [True, True]
    places.clear()
    for _ in range(5):
        await ex.run(fn, "u", rows(1))
    assert not any(places)


async def test_time_waiting_for_the_gil_in_the_thread_does_not_count() -> None:
    """A call in the thread is timed by its CPU time: the event loop holding the GIL
    meanwhile (here, 20 ms of busy work) does not make a tiny model look slow."""
    fn = Recorder()
    ex = Executor(inline_max_s=0.001)
    started, go = threading.Event(), threading.Event()

    def tiny(unit: Hashable, x: np.ndarray) -> list[float]:
        started.set()
        go.wait()  # returns only once the loop holds the GIL and is busy
        return fn(unit, x)

    for _ in range(8):
        async with anyio.create_task_group() as tg:
            tg.start_soon(ex.run, tiny, "u", rows(1))
            await anyio.to_thread.run_sync(started.wait)
            go.set()
            end = time.perf_counter() + 0.02
            while time.perf_counter() < end:  # the event loop busy, holding the GIL
                pass
        started.clear()
        go.clear()
    assert ex.per_call_s > ex.predicted_s(1)  # by the clock, each call waited for the GIL
    assert ex.measured and ex.inline_for(1)


async def test_model_that_waits_runs_in_the_thread_until_tried_again() -> None:
    """Two inline calls in a row that mostly wait (a model on its own threads, or on I/O)
    send the model to the thread for ``_WAITED_CALLS`` calls; then it is tried inline."""
    fn = Recorder()
    places: list[bool] = []
    ex = Executor(inline_max_s=0.001,
                  on_call=lambda inline, *_: places.append(inline))
    for _ in range(10):
        await ex.run(fn, "u", rows(1))
    fn.seconds, fn.sleeps = 0.003, True
    await ex.run(fn, "u", rows(1))
    assert ex.inline_for(1)  # once may be the process not being scheduled
    await ex.run(fn, "u", rows(1))
    assert places[-2:] == [True, True] and not ex.inline_for(1)
    places.clear()
    fn.seconds = 0.0
    for _ in range(_WAITED_CALLS):
        await ex.run(fn, "u", rows(1))
    assert not any(places)
    await ex.run(fn, "u", rows(1))
    assert places[-1] is True


async def test_forced_placements() -> None:
    fn = Recorder(seconds=0.001)
    inline = Executor(placement="inline")
    await inline.run(fn, "u", rows(1))
    assert fn.threads[-1] == threading.get_ident()
    thread = Executor(placement="thread")
    fn.seconds = 0.0
    for _ in range(20):
        await thread.run(fn, "u", rows(1))
    assert threading.get_ident() not in fn.threads[1:]


def test_bad_threshold_raises() -> None:
    with pytest.raises(ValueError):
        Executor(inline_max_s=-1)


async def test_a_collection_during_a_call_is_not_the_models_time() -> None:
    fn = Recorder()
    ex = Executor(inline_max_s=0.001)
    for _ in range(10):
        await ex.run(fn, "u", rows(1))
    assert ex.inline_for(1)
    heap = [[i] for i in range(300_000)]  # a collection over these takes milliseconds

    def collected(unit: Hashable, x: np.ndarray) -> list[float]:
        gc.collect()
        return fn(unit, x)

    start = time.perf_counter()
    await ex.run(collected, "u", rows(1))
    assert time.perf_counter() - start > 0.001  # the call did last longer than the limit
    assert ex.inline_for(1)
    del heap


async def test_a_call_costs_a_fixed_part_plus_a_part_per_row() -> None:
    """A model with a large cost per call and a small one per row: measured on one-row calls,
    64 rows are first assumed to cost 64 calls (thread); once one such call is measured,
    its true cost (one call plus 63 cheap rows) is known, and it runs inline."""

    def model(_unit: Hashable, x: np.ndarray) -> list[float]:
        end = time.thread_time() + 0.0004 + 0.00001 * len(x)
        while time.thread_time() < end:  # the model's own work
            pass
        return x[:, 0].tolist()

    ex = Executor(inline_max_s=0.002)
    for _ in range(10):
        await ex.run(model, "u", rows(1))
    assert ex.inline_for(1) and not ex.inline_for(64)
    await ex.run(model, "u", rows(*range(64)))  # in the thread: measures the rows' part
    assert ex.inline_for(64) and 0.0008 < ex.predicted_s(64) < 0.0016


async def test_a_call_slowed_only_by_preemption_is_not_waiting(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Slow by the clock without the thread ever blocking is the process being preempted by
    others (a busy machine): the model stays inline."""
    from gateway.core import runner

    fn = Recorder()
    ex = Executor(inline_max_s=0.001)
    for _ in range(10):
        await ex.run(fn, "u", rows(1))
    monkeypatch.setattr(runner, "_blocked_count", lambda: 0)  # as if it never blocked
    fn.seconds, fn.sleeps = 0.003, True
    for _ in range(3):
        await ex.run(fn, "u", rows(1))
    assert ex.inline_for(1)



async def test_one_outlier_does_not_pin_the_averages_under_load() -> None:
    """One-row calls 100 times their usual cost send the model to the thread, but move the
    averages by at most ``_OUTLIER`` times; a small cost measured while the model was slow is
    bounded by the calls of more rows that follow (under load no small call may come to
    correct it)."""
    fn = Recorder(seconds=50e-6, per_row=15e-6)
    ex = Executor(inline_max_s=1e-3)
    for _ in range(10):
        await ex.run(fn, "u", rows(1))
    fn.seconds = 5e-3
    await ex.run(fn, "u", rows(1))  # inline, 5 ms: an outlier
    await ex.run(fn, "u", rows(1))  # and again
    assert not ex.inline_for(1)  # to the thread for a while
    assert ex.predicted_s(1) < _OUTLIER * 60e-6
    fn.seconds = 50e-6
    for _ in range(10):
        await ex.run(fn, "u", rows(*range(20)))
    assert ex.predicted_s(1) < _OUTLIER * 60e-6
    assert 10e-6 < ex.predicted_s(20) / 20 < 40e-6

    slow_start = Executor(inline_max_s=0.01)
    fn.seconds = 2e-3
    for _ in range(10):  # a cold start: small calls at 2 ms
        await slow_start.run(fn, "u", rows(1))
    fn.seconds = 50e-6
    for _ in range(10):  # then only calls of 20 rows, at ~0.3 ms
        await slow_start.run(fn, "u", rows(*range(20)))
    assert slow_start.predicted_s(1) < 1e-3


async def test_the_least_small_call_is_kept_over_the_recent_ones() -> None:
    fn = Recorder(seconds=300e-6)
    ex = Executor(placement="thread")
    assert ex.least_small_s is None
    await ex.run(fn, "u", rows(1))
    fn.seconds = 50e-6
    await ex.run(fn, "u", rows(1, 2))
    await ex.run(fn, "u", rows(*range(20)))  # not a small call
    fn.seconds = 400e-6
    for _ in range(15):
        await ex.run(fn, "u", rows(1))
    least = ex.least_small_s
    assert least is not None and 50e-6 <= least < 300e-6
    await ex.run(fn, "u", rows(1))  # the 50 us call is now older than the last 16
    least = ex.least_small_s
    assert least is not None and least >= 300e-6


async def test_a_small_call_is_due_after_many_bigger_ones_and_taken_once() -> None:
    fn = Recorder()
    ex = Executor(placement="thread")
    for _ in range(_SMALL_DUE_CALLS - 1):
        await ex.run(fn, "u", rows(1, 2, 3))
    assert not ex.take_small_call()
    await ex.run(fn, "u", rows(1, 2, 3))
    assert ex.take_small_call()
    assert not ex.take_small_call()  # taken: one lone call, not every lone row
    for _ in range(_SMALL_DUE_CALLS):
        await ex.run(fn, "u", rows(1, 2, 3))
    await ex.run(fn, "u", rows(1, 2))  # a small call came by itself: nothing is due
    assert not ex.take_small_call()


async def test_a_call_queued_while_one_computes_starts_as_it_ends_without_the_loop() -> None:
    """The version's thread takes the next call itself: here the event loop is blocked from
    the moment the first call may end until the second has started."""
    ex = Executor(placement="thread")
    entered: list[str] = []
    computing, gate, second = threading.Event(), threading.Event(), threading.Event()

    def fn(unit: Hashable, x: np.ndarray) -> list[float]:
        entered.append(str(unit))
        computing.set()
        if unit == "first":
            gate.wait(timeout=30)
        else:
            second.set()
        return x[:, 0].tolist()

    async with anyio.create_task_group() as tg:
        tg.start_soon(ex.run, fn, "first", rows(1))
        await anyio.to_thread.run_sync(computing.wait)
        tg.start_soon(ex.run, fn, "second", rows(2))
        await wait_for(lambda: ex.queued_calls == 1)
        assert entered == ["first"]  # one call computes at a time
        gate.set()
        assert second.wait(timeout=30)  # (blocks the loop: the thread started it alone)
    assert entered == ["first", "second"]


async def test_the_switch_interval_is_short_only_while_calls_wait_for_the_thread() -> None:
    own = sys.getswitchinterval()
    gate = threading.Event()
    seen: list[float] = []

    def model(_unit: Hashable, x: np.ndarray) -> list[float]:
        seen.append(sys.getswitchinterval())
        gate.wait(10)
        return x[:, 0].tolist()

    SwitchInterval.prefer_models(1e-4)
    try:
        ex = Executor(placement="thread")
        async with anyio.create_task_group() as tg:
            async def run(v: float) -> None:
                assert await ex.run(model, "u", rows(v)) == [v]

            tg.start_soon(run, 1.0)
            await wait_for(lambda: len(seen) == 1)  # the first call runs: none queued behind it
            tg.start_soon(run, 2.0)
            tg.start_soon(run, 3.0)
            await wait_for(lambda: ex.queued_calls == 2)
            gate.set()
        # the first started alone, the second with the third waiting, the third alone
        assert seen == [own, pytest.approx(1e-4), own]
        assert sys.getswitchinterval() == own
    finally:
        SwitchInterval.prefer_models(None)
    assert sys.getswitchinterval() == own and SwitchInterval.busy_s is None


async def test_model_threads_alive_are_counted_until_they_end(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``ModelThreads.alive`` counts the threads of every version while they run: one more
    from the first call on, one fewer once it has ended for want of calls. (Model threads of
    earlier tests end after their own idle time: a round during which another thread ended is
    not judged, and run again.)"""
    monkeypatch.setattr("gateway.core.runner._THREAD_IDLE_S", 0.01)
    for _ in range(5):
        others = set(threading.enumerate())
        before = ModelThreads.alive
        threads = ModelThreads(name="counted")
        answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        threads.start(lambda _u, rows: len(rows), "u", np.zeros((3, 1)), lambda: None,
                      lambda result, _error, answer=answer: answer.set_result(result))
        assert await answer == 3
        started = ModelThreads.alive
        (worker,) = [t for t in threading.enumerate() if t.name == "counted"]
        await anyio.to_thread.run_sync(worker.join)
        ended = ModelThreads.alive
        if others <= set(threading.enumerate()):  # no other thread ended meanwhile
            assert (started, ended) == (before + 1, before)
            return
    raise AssertionError("other threads kept ending: five rounds could not be judged")
