"""The Redis rule: a model's measured call for the rows at hand against the measured round trip
(or the override), with hysteresis; said in words and by a gauge."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest

from gateway.core.runner import ModelRunner
from gateway.core.sharing import Sharing
from gateway.metrics import Metrics


class FakeExecutor:
    """What ``Sharing`` reads of an ``Executor``: whether measured, predicted CPU seconds."""

    def __init__(self, small_s: float | None, per_row_s: float = 0.0) -> None:
        self.small_s = small_s
        self.per_row_s = per_row_s
        self.least_s: float | None = None  # least_small_s, when set apart from small_s

    @property
    def least_small_s(self) -> float | None:
        return self.small_s if self.least_s is None else self.least_s

    @property
    def measured(self) -> bool:
        return self.small_s is not None

    def predicted_s(self, rows: int) -> float:
        assert self.small_s is not None
        return self.small_s + self.per_row_s * max(0, rows - 2)


def runner(small_s: float | None, per_row_s: float = 0.0, version: int = 1) -> Any:
    return SimpleNamespace(executor=FakeExecutor(small_s, per_row_s),
                           manifest=SimpleNamespace(name="m", version=version))


class Clock:
    """A settable round trip."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds

    def __call__(self) -> float | None:
        return self.seconds


def gauge(metrics: Metrics, version: int = 1) -> float | None:
    return metrics.registry.get_sample_value("gateway_l2_consulted",
                                             {"model": "m", "version": str(version)})


def test_unmeasured_calls_or_round_trip_consult_redis() -> None:
    metrics = Metrics({})
    rtt = Clock(None)
    rule = Sharing(metrics, round_trip_s=rtt)
    assert rule.consult(cast(ModelRunner, runner(None)), 1)
    assert gauge(metrics) == 1
    assert rule.explain(cast(ModelRunner, runner(None)))["reason"].startswith(
        "calls not measured yet")
    r = cast(ModelRunner, runner(10e-6))
    assert rule.consult(r, 1)
    assert rule.explain(r)["reason"].startswith("Redis round trip not measured yet")


def test_a_cheap_model_skips_redis_and_says_why() -> None:
    metrics = Metrics({})
    rule = Sharing(metrics, round_trip_s=Clock(110e-6))
    r = cast(ModelRunner, runner(40e-6))
    assert not rule.consult(r, 1)
    said = rule.explain(r)
    assert said == {"consulted": False,
                    "reason": "call 0.040 ms < Redis round trip 0.110 ms: answering again is "
                              "cheaper",
                    "call_ms": 0.04, "reference_ms": 0.11}
    assert gauge(metrics) == 0


def test_a_dear_model_consults_redis() -> None:
    metrics = Metrics({})
    rule = Sharing(metrics, round_trip_s=Clock(110e-6))
    r = cast(ModelRunner, runner(300e-6))
    assert rule.consult(r, 1)
    assert rule.explain(r)["reason"] == "call 0.300 ms >= Redis round trip 0.110 ms"
    assert gauge(metrics) == 1


def test_hysteresis_stops_below_the_round_trip_and_starts_again_at_twice_it() -> None:
    metrics = Metrics({})
    rule = Sharing(metrics, round_trip_s=Clock(100e-6))
    model = runner(150e-6)
    r = cast(ModelRunner, model)
    assert rule.consult(r, 1)
    model.executor.small_s = 100e-6  # one round trip: still consulted
    assert rule.consult(r, 1)
    model.executor.small_s = 99e-6
    assert not rule.consult(r, 1)
    assert gauge(metrics) == 0
    for cost in (100e-6, 150e-6, 199e-6):  # dearer than a round trip, below twice: skipped
        model.executor.small_s = cost
        assert not rule.consult(r, 1)
    assert rule.explain(r)["reason"] == (
        "call 0.199 ms >= Redis round trip 0.100 ms, but skipped until it costs 2 times that "
        "(it cost less)")
    model.executor.small_s = 200e-6
    assert rule.consult(r, 1)
    assert gauge(metrics) == 1


def test_a_model_dearer_once_consulted_is_still_skipped_below_the_reference() -> None:
    """Consulting makes the calls dearer (batched beside a busier loop): a model that started
    consulted while cheaper than a lookup stops as soon as it is measured so, and its dearer
    calls under that load do not bring it back."""
    rule = Sharing(Metrics({}), round_trip_s=Clock(90e-6), floor_s=300e-6)
    model = runner(None)
    r = cast(ModelRunner, model)
    assert rule.consult(r, 1)  # not measured yet
    model.executor.small_s = 240e-6  # measured while consulted: under the 0.3 ms lookup
    assert not rule.consult(r, 1)
    model.executor.small_s = 160e-6
    assert not rule.consult(r, 1)
    model.executor.small_s = 290e-6
    assert not rule.consult(r, 1)


def test_the_round_trip_is_read_each_time() -> None:
    rtt = Clock(100e-6)
    rule = Sharing(Metrics({}), round_trip_s=rtt)
    r = cast(ModelRunner, runner(200e-6))
    assert rule.consult(r, 1)
    rtt.seconds = 1e-3  # Redis moved a network away: the model is now cheaper than asking
    assert not rule.consult(r, 1)
    rtt.seconds = 100e-6  # back: the call costs twice the round trip again
    assert rule.consult(r, 1)


def test_a_block_dearer_than_a_round_trip_is_looked_up_while_small_calls_skip() -> None:
    rule = Sharing(Metrics({}), round_trip_s=Clock(100e-6))
    r = cast(ModelRunner, runner(20e-6, per_row_s=5e-6))
    assert not rule.consult(r, 1)
    assert not rule.consult(r, 10)  # 60 us
    assert rule.consult(r, 20)  # 110 us
    assert not rule.consult(r, 1)  # the state is the small call's


def test_the_override_replaces_the_round_trip() -> None:
    metrics = Metrics({})
    rule = Sharing(metrics, round_trip_s=Clock(100e-6), override_s=1e-3)
    r = cast(ModelRunner, runner(300e-6))
    assert not rule.consult(r, 1)
    assert rule.explain(r)["reason"].startswith("call 0.300 ms < GATEWAY_L2_MIN_CALL_US 1.000 ms")
    always = Sharing(metrics, round_trip_s=Clock(100e-6), override_s=0)
    tiny = cast(ModelRunner, runner(1e-9, version=2))
    assert always.consult(tiny, 1)
    assert always.explain(tiny)["reason"] == "GATEWAY_L2_MIN_CALL_US=0: always consulted"
    with pytest.raises(ValueError):
        Sharing(metrics, round_trip_s=Clock(None), override_s=-1)


def test_forget_removes_the_gauge() -> None:
    metrics = Metrics({})
    rule = Sharing(metrics, round_trip_s=Clock(100e-6))
    r = cast(ModelRunner, runner(10e-6))
    assert not rule.consult(r, 1)
    assert gauge(metrics) == 0
    rule.forget(r)
    assert gauge(metrics) is None
    assert not rule.consult(r, 1)  # as new: measured cheap, skipped again


def test_a_lookup_costs_at_least_its_event_loop_work() -> None:
    """With a floor (a block coordinated across replicas costs the event loop more than the
    round trip), a model cheaper than the floor skips Redis though dearer than the round
    trip, and says both figures; a block dearer than the floor is looked up."""
    metrics = Metrics({})
    rule = Sharing(metrics, round_trip_s=Clock(100e-6), floor_s=300e-6)
    r = cast(ModelRunner, runner(120e-6, per_row_s=15e-6))
    assert not rule.consult(r, 1)
    assert rule.explain(r)["reason"] == (
        "call 0.120 ms < Redis lookup 0.300 ms (its event-loop work; round trip 0.100 ms): "
        "answering again is cheaper")
    assert rule.explain(r)["reference_ms"] == 0.3
    assert not rule.consult(r, 10)  # 240 us
    assert rule.consult(r, 32)  # 570 us
    assert Sharing(Metrics({}), round_trip_s=Clock(100e-6)).consult(
        cast(ModelRunner, runner(120e-6)), 1)  # without the floor: dearer than a round trip
    slow = Sharing(Metrics({}), round_trip_s=Clock(1e-3), floor_s=300e-6)
    assert slow.explain(r)["reason"].startswith("call 0.120 ms < Redis round trip 1.000 ms")
    with pytest.raises(ValueError):
        Sharing(metrics, round_trip_s=Clock(None), floor_s=-1)


def test_a_lone_row_is_judged_by_the_least_of_its_recent_calls() -> None:
    """A loaded machine makes some calls dear (cold caches, contention): a lone row is judged
    by the least cost of the model's recent small calls, as the round trip is the least of
    recent PINGs; a block by its predicted call."""
    rule = Sharing(Metrics({}), round_trip_s=Clock(100e-6), floor_s=300e-6)
    model = runner(400e-6, per_row_s=15e-6)
    model.executor.least_s = 60e-6
    r = cast(ModelRunner, model)
    assert not rule.consult(r, 1)
    assert rule.explain(r)["call_ms"] == 0.06
    assert rule.consult(r, 3)  # 415 us predicted


def test_bigger_blocks_of_a_cheap_model_are_looked_up_while_redis_answers_some() -> None:
    """A model skipping Redis for a lone row has its bigger blocks looked up until 4,096 rows
    in a row found nothing; then one block in 16, until one is answered again. A model dearer
    than a lookup is consulted whatever Redis answers."""
    rule = Sharing(Metrics({}), round_trip_s=Clock(100e-6), floor_s=300e-6)
    r = cast(ModelRunner, runner(40e-6, per_row_s=16e-6))
    assert not rule.consult(r, 1)
    for _ in range(127):
        assert rule.consult(r, 32)
        rule.looked_up(r, 32, 0)
    rule.looked_up(r, 31, 1)  # one row answered: counting starts again
    for _ in range(128):
        assert rule.consult(r, 32)
        rule.looked_up(r, 32, 0)
    judged = [rule.consult(r, 32) for _ in range(64)]
    assert judged == ([False] * 15 + [True]) * 4
    assert rule.explain(r)["reason"].endswith(
        "; bigger blocks: Redis answered none of the last 4,096 rows looked up, one block in "
        "16 looked up")
    rule.looked_up(r, 32, 2)  # a probe answered
    assert all(rule.consult(r, 32) for _ in range(32))
    assert not rule.consult(r, 10)  # cheaper than the reference, as before

    dear = cast(ModelRunner, runner(400e-6, per_row_s=16e-6, version=2))
    rule.looked_up(dear, 100_000, 0)
    assert rule.consult(dear, 1) and rule.consult(dear, 32)
    rule.forget(r)
    assert rule.consult(r, 32)
