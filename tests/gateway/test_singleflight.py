from __future__ import annotations

import asyncio

import pytest

from gateway.singleflight import SingleFlight

pytestmark = pytest.mark.anyio


async def test_concurrent_calls_share_one_computation() -> None:
    group: SingleFlight[str, int] = SingleFlight()
    release = asyncio.Event()
    runs = 0

    async def work() -> int:
        nonlocal runs
        runs += 1
        await release.wait()
        return 42

    tasks = [asyncio.create_task(group.do("k", work)) for _ in range(50)]
    await asyncio.sleep(0)  # let every task reach do(); nothing is timed
    release.set()
    results = await asyncio.gather(*tasks)
    assert runs == 1
    assert [v for v, _ in results] == [42] * 50
    assert sum(shared for _, shared in results) == 49
    assert len(group) == 0


async def test_error_reaches_every_waiter_and_is_not_kept() -> None:
    group: SingleFlight[str, int] = SingleFlight()
    release = asyncio.Event()
    runs = 0

    async def failing() -> int:
        nonlocal runs
        runs += 1
        await release.wait()
        raise ValueError("boom")

    tasks = [asyncio.create_task(group.do("k", failing)) for _ in range(5)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, ValueError) for r in results)
    assert runs == 1

    async def ok() -> int:
        return 7

    assert await group.do("k", ok) == (7, False)


async def test_cancelled_first_caller_does_not_cancel_the_others() -> None:
    group: SingleFlight[str, str] = SingleFlight(abandon=True)
    started = asyncio.Event()
    release = asyncio.Event()

    async def work() -> str:
        started.set()
        await release.wait()
        return "done"

    first = asyncio.create_task(group.do("k", work))
    await started.wait()
    followers = [asyncio.create_task(group.do("k", work)) for _ in range(3)]
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    release.set()
    assert [await f for f in followers] == [("done", True)] * 3


async def test_last_caller_leaving_abandons_and_next_call_starts_afresh() -> None:
    group: SingleFlight[str, str] = SingleFlight(abandon=True)
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def hang() -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    caller = asyncio.create_task(group.do("k", hang))
    await started.wait()
    caller.cancel()
    await cancelled.wait()

    async def quick() -> str:
        return "fresh"

    assert await group.do("k", quick) == ("fresh", False)


async def test_without_abandon_the_work_finishes_for_nobody() -> None:
    group: SingleFlight[str, str] = SingleFlight()
    release = asyncio.Event()
    finished = asyncio.Event()

    async def work() -> str:
        await release.wait()
        finished.set()
        return "stored"

    caller = asyncio.create_task(group.do("k", work))
    await asyncio.sleep(0)
    caller.cancel()
    release.set()
    await finished.wait()
    await group.aclose()
