"""Loads in flight: one load per key at a time, shared by every caller."""

from __future__ import annotations

import asyncio

import pytest

from model_store.inflight import InFlight

pytestmark = pytest.mark.anyio


async def test_concurrent_calls_share_one_run() -> None:
    group: InFlight[str, int] = InFlight()
    release = asyncio.Event()
    runs = 0

    async def load() -> int:
        nonlocal runs
        runs += 1
        await release.wait()
        return 7

    callers = [asyncio.create_task(group.do("k", load)) for _ in range(10)]
    await asyncio.sleep(0)
    assert len(group) == 1
    release.set()
    assert await asyncio.gather(*callers) == [7] * 10
    assert runs == 1 and len(group) == 0
    assert await group.do("k", load) == 7 and runs == 2  # the key is free again


async def test_an_error_reaches_every_caller_and_is_not_kept() -> None:
    group: InFlight[str, int] = InFlight()
    release = asyncio.Event()
    attempts = 0

    async def load() -> int:
        nonlocal attempts
        attempts += 1
        await release.wait()
        if attempts == 1:
            raise OSError("disk")
        return 1

    callers = [asyncio.create_task(group.do("k", load)) for _ in range(3)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert [type(r) for r in results] == [OSError] * 3
    assert await group.do("k", load) == 1 and attempts == 2


async def test_a_cancelled_caller_leaves_the_load_to_the_others() -> None:
    group: InFlight[str, int] = InFlight()
    started, release = asyncio.Event(), asyncio.Event()

    async def load() -> int:
        started.set()
        await release.wait()
        return 3

    first = asyncio.create_task(group.do("k", load))
    second = asyncio.create_task(group.do("k", load))
    await started.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    release.set()
    assert await second == 3


async def test_aclose_cancels_what_is_in_flight() -> None:
    group: InFlight[str, int] = InFlight()
    started = asyncio.Event()

    async def load() -> int:
        started.set()
        await asyncio.Event().wait()
        return 0

    caller = asyncio.create_task(group.do("k", load))
    await started.wait()
    await group.aclose()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert len(group) == 0
