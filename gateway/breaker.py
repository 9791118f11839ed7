"""Circuit breaker for an optional dependency (Redis).

``closed``: calls go through. After ``failures`` consecutive failures it is ``open``: ``allow()``
is False for ``cooldown_s``. Then it is ``half_open``: ``allow()`` is True for exactly one probe;
its success closes the circuit, its failure opens it for another cooldown.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

__all__ = ["CircuitBreaker"]

State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Not thread-safe: use from one event loop."""

    def __init__(
        self,
        *,
        failures: int = 3,
        cooldown_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[State], None] | None = None,
    ) -> None:
        if failures < 1 or cooldown_s <= 0:
            raise ValueError("failures must be >= 1 and cooldown_s > 0")
        self._threshold = failures
        self._cooldown = cooldown_s
        self._clock = clock
        self._on_change = on_change
        self._state: State = "closed"
        self._failures = 0  # consecutive, while closed
        self._opened_at = 0.0
        self._probing = False  # a half-open probe is out

    @property
    def state(self) -> State:
        return self._state

    def blocked(self) -> bool:
        """Would ``allow()`` say no? Unlike ``allow()``, asking changes nothing."""
        if self._state == "closed":
            return False
        if self._state == "open" and self._clock() - self._opened_at < self._cooldown:
            return True
        return self._probing

    def allow(self) -> bool:
        """May a call be made now? In ``half_open`` only the first caller gets True."""
        if self._state == "closed":
            return True
        if self._state == "open":
            if self._clock() - self._opened_at < self._cooldown:
                return False
            self._set("half_open")
        if self._probing:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        self._failures = 0
        self._probing = False
        if self._state != "closed":
            self._set("closed")

    def failure(self) -> None:
        self._probing = False
        self._failures += 1
        if self._state == "half_open" or self._failures >= self._threshold:
            self._opened_at = self._clock()
            self._failures = 0
            if self._state != "open":
                self._set("open")

    def _set(self, state: State) -> None:
        self._state = state
        if self._on_change is not None:
            self._on_change(state)
