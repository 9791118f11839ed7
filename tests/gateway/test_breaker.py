from __future__ import annotations

from gateway.breaker import CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_consecutive_failures_and_probes_once_after_cooldown() -> None:
    clock = Clock()
    states: list[str] = []
    b = CircuitBreaker(failures=3, cooldown_s=2.0, clock=clock, on_change=states.append)
    b.failure()
    b.failure()
    b.success()  # resets the count
    b.failure()
    b.failure()
    assert b.allow() and b.state == "closed"
    b.failure()
    assert b.state == "open" and not b.allow() and b.blocked()
    clock.now = 2.5
    assert not b.blocked()
    assert b.allow()  # the single probe
    assert not b.allow() and b.blocked()
    b.failure()  # probe failed: open again for a full cooldown
    assert b.state == "open" and not b.allow()
    clock.now = 5.0
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow()
    assert states == ["open", "half_open", "open", "half_open", "closed"]
