"""Inline vs worker-thread placement of model calls."""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable

import anyio
import numpy as np
import pytest

from gateway.core.runner import Executor

pytestmark = pytest.mark.anyio


class Recorder:
    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.threads: list[int] = []

    def __call__(self, _unit: Hashable, rows: np.ndarray) -> list[float]:
        self.threads.append(threading.get_ident())
        if self.seconds:
            time.sleep(self.seconds)  # the model's own work, not a test wait
        return rows[:, 0].tolist()


def rows(*values: float) -> np.ndarray:
    return np.array(values, dtype=float).reshape(-1, 1)


async def test_tiny_calls_move_inline_after_warmup() -> None:
    fn = Recorder()
    places: list[bool] = []
    ex = Executor(limiter=anyio.CapacityLimiter(1), inline_max_s=0.01,
                  on_call=lambda inline, _s: places.append(inline))
    for _ in range(20):
        assert await ex.run(fn, "u", rows(1, 2)) == [1, 2]
    assert places[:8] == [False] * 8 and all(places[8:])
    assert fn.threads[-1] == threading.get_ident()


async def test_slow_model_never_runs_inline() -> None:
    fn = Recorder(seconds=0.002)
    places: list[bool] = []
    ex = Executor(limiter=anyio.CapacityLimiter(1), inline_max_s=100e-6,
                  on_call=lambda inline, _s: places.append(inline))
    for _ in range(30):
        await ex.run(fn, "u", rows(1))
    assert not any(places)
    assert threading.get_ident() not in fn.threads


async def test_model_that_slows_down_goes_back_to_the_thread() -> None:
    fn = Recorder()
    places: list[bool] = []
    ex = Executor(limiter=anyio.CapacityLimiter(1), inline_max_s=0.001,
                  on_call=lambda inline, _s: places.append(inline))
    for _ in range(10):
        await ex.run(fn, "u", rows(1))
    assert places[-1] is True
    fn.seconds = 0.005
    await ex.run(fn, "u", rows(1))  # one slow inline call
    places.clear()
    for _ in range(5):
        await ex.run(fn, "u", rows(1))
    assert not any(places)


async def test_forced_placements() -> None:
    fn = Recorder(seconds=0.001)
    inline = Executor(limiter=anyio.CapacityLimiter(1), placement="inline")
    await inline.run(fn, "u", rows(1))
    assert fn.threads[-1] == threading.get_ident()
    thread = Executor(limiter=anyio.CapacityLimiter(1), placement="thread")
    fn.seconds = 0.0
    for _ in range(20):
        await thread.run(fn, "u", rows(1))
    assert threading.get_ident() not in fn.threads[1:]


def test_bad_threshold_raises() -> None:
    with pytest.raises(ValueError):
        Executor(limiter=anyio.CapacityLimiter(1), inline_max_s=-1)
