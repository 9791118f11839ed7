"""Where a model call runs: inline on the event loop when it is measured to be tiny, in a
worker thread otherwise.

A thread hop costs tens of microseconds; a compiled model answers a small batch in about as
long, so for such a model the hop is most of the cost. ``Executor`` keeps a moving average of
how long the model itself takes (per call and per row, measured around the call wherever it
runs) and runs a call inline only while the call it is about to make is predicted to take at
most ``inline_max_s``. Until it has measured enough calls, and
for any model whose calls are slower, it uses the thread (under the app's CapacityLimiter). A
model that slows down moves back to the thread after one slow call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Literal, TypeVar

import anyio

__all__ = ["Executor", "Placement"]

T = TypeVar("T")
R = TypeVar("R")

Placement = Literal["auto", "inline", "thread"]

_WARMUP_CALLS = 8  # calls measured in the thread before inline is considered
_ALPHA = 0.2  # weight of the newest call in the moving average


class Executor:
    """Runs ``fn(items)`` inline or in a worker thread; see the module docstring.

    ``on_call(inline, seconds)`` observes each call (metrics); it must not block.
    """

    def __init__(
        self,
        *,
        limiter: anyio.CapacityLimiter,
        placement: Placement = "auto",
        inline_max_s: float = 100e-6,
        on_call: Callable[[bool, float], None] | None = None,
    ) -> None:
        if inline_max_s < 0:
            raise ValueError(f"inline_max_s must be >= 0, got {inline_max_s}")
        self._limiter = limiter
        self._placement = placement
        self._inline_max = inline_max_s
        self._on_call = on_call
        self._calls = 0
        self._per_row_s = 0.0  # moving average of seconds per row
        self._per_call_s = 0.0  # moving average of seconds per call

    @property
    def per_call_s(self) -> float:
        """Moving average of one call's duration, seconds."""
        return self._per_call_s

    @property
    def measured(self) -> bool:
        """Have enough calls been measured for the averages to mean something?"""
        return self._calls >= _WARMUP_CALLS

    def predicted_s(self, rows: int) -> float:
        """Predicted duration of a call with ``rows`` rows (0 before any measurement)."""
        return max(self._per_call_s if rows <= 1 else 0.0, self._per_row_s * rows)

    def inline_for(self, rows: int) -> bool:
        if self._placement != "auto":
            return self._placement == "inline"
        return self.measured and self.predicted_s(rows) <= self._inline_max

    async def run(self, fn: Callable[[Sequence[T]], R], items: Sequence[T]) -> R:
        """``fn(items)``, inline or in a worker thread. Raises what ``fn`` raises."""
        if self.inline_for(len(items)):
            return self.run_inline(fn, items)
        took = [0.0]

        def timed(batch: Sequence[T]) -> R:  # the model's own time, without the thread hop
            start = time.perf_counter()
            try:
                return fn(batch)
            finally:
                took[0] = time.perf_counter() - start

        try:
            return await anyio.to_thread.run_sync(timed, items, limiter=self._limiter)
        finally:
            self._observe(False, len(items), took[0])

    def run_inline(self, fn: Callable[[Sequence[T]], R], items: Sequence[T]) -> R:
        """``fn(items)`` on the calling thread, measured. Only for calls ``inline_for``
        allows. Raises what ``fn`` raises."""
        start = time.perf_counter()
        try:
            return fn(items)
        finally:
            self._observe(True, len(items), time.perf_counter() - start)

    def _observe(self, inline: bool, rows: int, seconds: float) -> None:
        self._calls += 1
        per_row = seconds / max(1, rows)
        if self._calls == 1:
            self._per_row_s, self._per_call_s = per_row, seconds
        else:
            self._per_row_s += _ALPHA * (per_row - self._per_row_s)
            self._per_call_s += _ALPHA * (seconds - self._per_call_s)
            if inline and seconds > self._inline_max:
                # One slow inline call is enough: back to the thread until it measures fast.
                self._per_row_s = max(self._per_row_s, per_row)
                self._per_call_s = max(self._per_call_s, seconds)
        if self._on_call is not None:
            self._on_call(inline, seconds)
