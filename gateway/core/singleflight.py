"""Single-flight over blocks of keys: concurrent calls for one key share one computation.

A call names a block of keys. Keys already in flight are *joined*: the caller waits for the
computation that owns them. The rest are *owned* by one new computation for the whole block,
``fn(positions)``, which the group runs in a task of its own; every caller (the first included)
awaits a future of its own, which the task resolves the moment ``fn`` returns (a caller
resumes in the loop's next step, not two steps later as through ``asyncio.shield``). So:

* a caller that is cancelled (client gone, its own deadline) leaves the others waiting on the
  same task, untouched;
* an error raised by ``fn`` reaches every caller waiting on that computation at that moment,
  and nothing of it is kept: the next call for those keys computes again;
* a key is free again once its computation has its outcome, which is after ``fn`` returned,
  so a result that ``fn`` stores before returning (the L1 cache) is visible before the key
  frees.

With ``abandon=True`` a computation is cancelled when its last caller leaves before it
finished, so work nobody waits for any more is dropped (queued rows never reach the model); a
call arriving after that starts afresh. With ``abandon=False`` the work always finishes, as in
Go's ``x/sync/singleflight``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

__all__ = ["SingleFlight"]


@dataclass(eq=False, slots=True)
class _Flight(Generic[K, V]):
    keys: list[K]  # written once: the keys this computation owns, in its result's order
    task: asyncio.Task[Sequence[V]] = field(init=False)  # written once, right after creation
    waiters: list[asyncio.Future[Sequence[V]]] = field(default_factory=list)  # callers' now
    abandoned: bool = False  # set once, when the last caller left and the task was cancelled


class SingleFlight(Generic[K, V]):
    """In-flight computations keyed per ``K``. Use from one event loop."""

    def __init__(self, *, abandon: bool = False) -> None:
        self._abandon = abandon
        self._keys: dict[K, tuple[_Flight[K, V], int]] = {}  # key -> (owner, index in result)

    def __len__(self) -> int:
        """Keys in flight now."""
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        """Is ``key`` in flight now?"""
        return key in self._keys

    def any_in_flight(self, keys: Sequence[K]) -> bool:
        return any(k in self._keys for k in keys)

    def waiting(self) -> int:
        """Callers waiting now, over all computations."""
        return sum(len(f.waiters) for f in {id(f): f for f, _ in self._keys.values()}.values())

    async def do(
        self, keys: Sequence[K], fn: Callable[[list[int]], Awaitable[Sequence[V]]]
    ) -> tuple[list[V], int]:
        """Values for ``keys`` (same order), computing each key at most once at a time.

        ``fn(positions)`` computes the keys at ``positions`` of ``keys`` that nobody computes
        yet and returns their values in that order. Returns ``(values, shared)``: ``shared``
        counts the positions answered by a computation another call started. Raises what
        ``fn`` raised (for any computation this call waits on). Cancelling the caller never
        cancels a computation others wait on.
        """
        where: list[tuple[_Flight[K, V], int]] = []
        owned: list[int] = []  # positions in `keys` computed by this call's own flight
        mine: _Flight[K, V] | None = None
        own_index: dict[K, int] = {}
        shared = 0
        for pos, key in enumerate(keys):
            hit = self._keys.get(key)
            if hit is not None and not hit[0].abandoned:
                where.append(hit)
                if hit[0] is not mine:
                    shared += 1
                continue
            if mine is None:
                mine = _Flight([])
            j = own_index.get(key)
            if j is None:
                j = own_index[key] = len(mine.keys)
                mine.keys.append(key)
                owned.append(pos)
                self._keys[key] = (mine, j)
            where.append((mine, j))
        loop = asyncio.get_running_loop()
        if mine is not None:
            mine.task = loop.create_task(self._run(mine, fn, owned))
            mine.task.add_done_callback(functools.partial(self._finished, mine))
        flights = list({id(f): f for f, _ in where}.values())
        mine_waits: list[asyncio.Future[Sequence[V]]] = [loop.create_future() for _ in flights]
        for f, w in zip(flights, mine_waits, strict=True):
            f.waiters.append(w)
        try:
            results = {}
            for f, w in zip(flights, mine_waits, strict=True):
                results[id(f)] = await w
        finally:
            for f, w in zip(flights, mine_waits, strict=True):
                f.waiters.remove(w)
                if w.done() and not w.cancelled():
                    w.exception()  # retrieved: this caller may have left before reading it
                if self._abandon and not f.waiters and not f.task.done():
                    f.abandoned = True
                    f.task.cancel()
        return [results[id(f)][j] for f, j in where], shared

    async def _run(self, flight: _Flight[K, V],
                   fn: Callable[[list[int]], Awaitable[Sequence[V]]], owned: list[int]
                   ) -> Sequence[V]:
        try:
            result = await fn(owned)
        except BaseException as exc:
            self._tell(flight, None, exc)
            raise
        self._tell(flight, result, None)
        return result

    def _tell(self, flight: _Flight[K, V], result: Sequence[V] | None,
              error: BaseException | None) -> None:
        """The computation's outcome: its keys freed (a later call computes them again, or
        finds what ``fn`` stored), its callers' futures resolved."""
        for key in flight.keys:
            if self._keys.get(key, (None,))[0] is flight:
                del self._keys[key]
        for w in flight.waiters:
            if w.done():
                continue
            if error is None:
                w.set_result(result)  # type: ignore[arg-type]  # (None only with an error)
            elif isinstance(error, asyncio.CancelledError):
                w.cancel()
            else:
                w.set_exception(error)

    def _finished(self, flight: _Flight[K, V], _task: object) -> None:
        if flight.task.cancelled():  # before it started (aclose): nobody was told
            self._tell(flight, None, asyncio.CancelledError())
        else:
            flight.task.exception()  # retrieved: an error nobody awaited is not logged as lost

    async def aclose(self) -> None:
        """Cancel every computation still in flight and wait until they have ended."""
        tasks = list({id(f): f.task for f, _ in self._keys.values()}.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

