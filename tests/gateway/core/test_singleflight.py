from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from gateway.core.singleflight import SingleFlight
from tests.support import LoopSteps, wait_for

pytestmark = pytest.mark.anyio

Fn = Callable[[list[int]], Awaitable[list[str]]]


class Work:
    """A computation that records the keys it was asked for and waits for ``release``."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        self.runs: list[list[str]] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.fail: Exception | None = None

    async def __call__(self, positions: list[int]) -> list[str]:
        self.runs.append([self.keys[p] for p in positions])
        self.started.set()
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return [self.keys[p].upper() for p in positions]


async def test_concurrent_calls_share_one_computation() -> None:
    group: SingleFlight[str, str] = SingleFlight()
    work = Work(["k"])
    tasks = [asyncio.create_task(group.do(["k"], work)) for _ in range(50)]
    await work.started.wait()
    await wait_for(lambda: group.waiting() == 50)
    work.release.set()
    results = await asyncio.gather(*tasks)
    assert work.runs == [["k"]]
    assert [v for v, _ in results] == [["K"]] * 50
    assert sum(shared for _, shared in results) == 49
    assert len(group) == 0


async def test_block_joins_keys_in_flight_and_owns_the_rest() -> None:
    group: SingleFlight[str, str] = SingleFlight()
    first = Work(["a", "b"])
    one = asyncio.create_task(group.do(["a", "b"], first))
    await first.started.wait()
    second = Work(["b", "c", "d", "c"])
    two = asyncio.create_task(group.do(["b", "c", "d", "c"], second))
    await second.started.wait()
    assert second.runs == [["c", "d"]]  # "b" joined, "c" owned once
    first.release.set()
    second.release.set()
    assert await one == (["A", "B"], 0)
    assert await two == (["B", "C", "D", "C"], 1)
    assert len(group) == 0


async def test_error_reaches_every_waiter_and_is_not_kept() -> None:
    group: SingleFlight[str, str] = SingleFlight()
    work = Work(["k"])
    work.fail = ValueError("boom")
    tasks = [asyncio.create_task(group.do(["k"], work)) for _ in range(5)]
    await work.started.wait()
    work.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, ValueError) for r in results)
    assert work.runs == [["k"]]
    again = Work(["k"])
    again.release.set()
    assert await group.do(["k"], again) == (["K"], False)
    assert again.runs == [["k"]]


async def test_cancelled_first_caller_does_not_cancel_the_others() -> None:
    group: SingleFlight[str, str] = SingleFlight(abandon=True)
    work = Work(["k"])
    first = asyncio.create_task(group.do(["k"], work))
    await work.started.wait()
    followers = [asyncio.create_task(group.do(["k"], work)) for _ in range(3)]
    await wait_for(lambda: group.waiting() == 4)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert group.waiting() == 3 and "k" in group
    work.release.set()
    assert [await f for f in followers] == [(["K"], 1)] * 3
    assert work.runs == [["k"]]


async def test_last_caller_leaving_abandons_and_next_call_starts_afresh() -> None:
    group: SingleFlight[str, str] = SingleFlight(abandon=True)
    cancelled = asyncio.Event()
    started = asyncio.Event()

    async def hang(_positions: list[int]) -> list[str]:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return ["never"]

    caller = asyncio.create_task(group.do(["k"], hang))
    await started.wait()
    caller.cancel()
    await cancelled.wait()
    fresh = Work(["k"])
    fresh.release.set()
    assert await group.do(["k"], fresh) == (["K"], False)
    assert fresh.runs == [["k"]]


async def test_without_abandon_the_work_finishes_for_nobody_and_frees_the_key() -> None:
    group: SingleFlight[str, str] = SingleFlight()
    stored: list[str] = []

    async def work(_positions: list[int]) -> list[str]:
        await release.wait()
        stored.append("value")
        return ["value"]

    release = asyncio.Event()
    caller = asyncio.create_task(group.do(["k"], work))
    await wait_for(lambda: group.waiting() == 1)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert "k" in group  # the computation goes on without callers
    release.set()
    await wait_for(lambda: "k" not in group)
    assert stored == ["value"]
    await group.aclose()


async def test_callers_resume_in_the_step_after_the_computation_returns() -> None:
    group: SingleFlight[str, str] = SingleFlight()
    steps = LoopSteps().start()
    returned: list[int] = []

    async def fn(positions: list[int]) -> list[str]:
        await asyncio.sleep(0)
        returned.append(steps.now)
        return ["v" for _ in positions]

    try:
        assert await group.do(["k"], fn) == (["v"], 0)
        resumed = steps.now
    finally:
        steps.stop()
    assert resumed - returned[0] <= 1


async def test_a_call_made_as_soon_as_a_computation_failed_computes_again() -> None:
    """The keys are freed with the outcome: a caller calling again the moment it has the
    error starts a new computation rather than joining the failed one."""
    group: SingleFlight[str, str] = SingleFlight()
    runs: list[list[int]] = []

    async def fn(positions: list[int]) -> list[str]:
        runs.append(positions)
        if len(runs) == 1:
            raise ValueError("first")
        return ["v"]

    with pytest.raises(ValueError, match="first"):
        await group.do(["k"], fn)
    assert await group.do(["k"], fn) == (["v"], 0)
    assert runs == [[0], [0]] and "k" not in group
