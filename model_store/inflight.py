"""Loads in flight: concurrent requests for one key share one loading task.

The group owns the task, not the first caller: a caller that is cancelled leaves the load
running for the others (and the result is simply not awaited by it). An error reaches every
caller waiting at that moment and is not kept: the next call for the key starts afresh. The key
is free again as soon as the task has finished.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["InFlight"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class InFlight(Generic[K, V]):
    """Deduplicates concurrent ``do(key, fn)`` calls. Use from one event loop."""

    def __init__(self) -> None:
        self._tasks: dict[K, asyncio.Task[V]] = {}  # written on the event-loop thread only

    def __len__(self) -> int:
        """Keys in flight now."""
        return len(self._tasks)

    async def do(self, key: K, fn: Callable[[], Awaitable[V]]) -> V:
        """``await fn()`` once for all concurrent callers of ``key``; raises what it raised."""
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(_run(fn))
            self._tasks[key] = task
            task.add_done_callback(lambda t: self._finished(key, t))
        return await asyncio.shield(task)

    async def aclose(self) -> None:
        """Cancel the loads still in flight and wait until they have ended."""
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _finished(self, key: K, task: asyncio.Task[V]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled():
            task.exception()  # retrieved: an error nobody awaited any more is not logged as lost


async def _run(fn: Callable[[], Awaitable[V]]) -> V:
    return await fn()
