"""Single-flight: concurrent calls for one key share one computation.

The group, not the first caller, owns the computation: ``do`` starts ``fn()`` in a task of its
own and every caller (the first included) awaits it through ``asyncio.shield``. So:

* a caller that is cancelled (client gone, its own deadline) leaves the others waiting on the
  same task, untouched;
* an error raised by ``fn`` reaches every caller waiting at that moment, and nothing of it is
  kept: the next ``do`` for the key runs ``fn`` again;
* the key is free again once the task has finished, which is after ``fn`` returned, so a
  result that ``fn`` stores before returning (the L1 cache) is visible before the key frees.

With ``abandon=True`` the task is cancelled when its last caller leaves before it finished,
so work nobody waits for any more is dropped (a queued row never reaches the model); a call
arriving after that starts afresh. With ``abandon=False`` (the default) the work always
finishes, as in Go's ``x/sync/singleflight``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

__all__ = ["SingleFlight"]


@dataclass(eq=False, slots=True)
class _Call(Generic[V]):
    task: asyncio.Task[V]  # written once, when the call starts
    waiters: int = 0  # callers awaiting the task now; event-loop thread only
    abandoned: bool = False  # set once, when the last caller left and the task was cancelled


class SingleFlight(Generic[K, V]):
    """A group of in-flight calls keyed by ``K``. Use from one event loop."""

    def __init__(self, *, abandon: bool = False) -> None:
        self._abandon = abandon
        self._calls: dict[K, _Call[V]] = {}

    def __len__(self) -> int:
        """Keys in flight now."""
        return len(self._calls)

    def __contains__(self, key: object) -> bool:
        """Is ``key`` in flight now?"""
        return key in self._calls

    def waiting(self) -> int:
        """Callers waiting now, over all keys."""
        return sum(c.waiters for c in self._calls.values())

    async def do(self, key: K, fn: Callable[[], Awaitable[V]]) -> tuple[V, bool]:
        """Run ``fn()`` once for all concurrent callers of ``key``.

        Returns ``(value, shared)``: ``shared`` is True when this caller joined a computation
        started by another call. Raises what ``fn`` raised. Cancelling the caller never cancels
        the shared task (unless it was the last caller and the group abandons).
        """
        call = self._calls.get(key)
        shared = call is not None and not call.abandoned
        if call is None or call.abandoned:
            call = _Call(asyncio.get_running_loop().create_task(_run(fn)))
            self._calls[key] = call
            call.task.add_done_callback(functools.partial(self._finished, key, call))
        call.waiters += 1
        try:
            return await asyncio.shield(call.task), shared
        finally:
            call.waiters -= 1
            if self._abandon and call.waiters == 0 and not call.task.done():
                call.abandoned = True
                call.task.cancel()

    def _finished(self, key: K, call: _Call[V], _task: object) -> None:
        if self._calls.get(key) is call:
            del self._calls[key]
        if not call.task.cancelled():
            call.task.exception()  # retrieved: an error nobody awaited is not logged as lost

    async def aclose(self) -> None:
        """Cancel every computation still in flight and wait until they have ended."""
        tasks = [c.task for c in self._calls.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _run(fn: Callable[[], Awaitable[V]]) -> V:
    return await fn()
