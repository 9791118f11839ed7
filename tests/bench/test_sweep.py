"""The sweep's walk up the ladder, its bisection and its knee (a fake server model)."""

from __future__ import annotations

from bench.loadgen import Result
from bench.sweep import Step, Sweep, nice_rate, run_sweep


def result(rate: float, p50_ms: float = 1.0, p99_ms: float = 5.0, *, errors: int = 0,
           lateness_ms: float = 0.05, timeouts: int = 0, cpu_share: float = 0.1) -> Result:
    return Result(
        rate=rate, duration_s=2, sent=int(2 * rate), answered=int(2 * rate) - timeouts,
        errors=errors, failures=0, timeouts=timeouts,
        latency_us={50.0: int(p50_ms * 1000), 99.0: int(p99_ms * 1000),
                    100.0: int(p99_ms * 2000)},
        lateness_us={50.0: 10, 99.0: int(lateness_ms * 1000), 100.0: 2000},
        cpu_s=2.0 * cpu_share, wall_s=2.0, connections_opened=4, max_outstanding=3,
        waited_for_connection=0, max_lateness_ms=1.0)


class Server:
    """p99 grows with load and passes 50 ms above ``capacity`` req/s; records the rates. At
    ``late_at`` and above (``late_times`` runs) the generator is late by 20 ms, which shows
    in the p99 (80 ms): such a run proves nothing."""

    def __init__(self, capacity: float, *, late_at: float | None = None,
                 late_times: int = 99, cpu_share: float = 0.1,
                 stall_at: float | None = None) -> None:
        self.capacity = capacity
        self.stall_at = stall_at  # one run at this rate sees a 300 ms stall
        self.late_at = late_at
        self.late_times = late_times
        self.cpu_share = cpu_share
        self.asked: list[float] = []

    def measure(self, rate: float) -> Step:
        self.asked.append(rate)
        late = self.late_at is not None and rate >= self.late_at and self.late_times > 0
        if late:
            self.late_times -= 1
        p99 = 5.0 if rate <= self.capacity else 400.0
        if rate == self.stall_at:
            p99, self.stall_at = 300.0, None
        if late:
            p99 = max(p99, 80.0)
        return Step(rate, [result(rate, p99_ms=p99, lateness_ms=20.0 if late else 0.05,
                                  cpu_share=self.cpu_share)], [1.0])


LADDER = (100, 200, 500, 1000, 2000, 5000)


def test_walks_up_until_p99_passes_the_bound_then_bisects() -> None:
    server = Server(capacity=1400)
    sweep = run_sweep("full", "unique", server.measure, LADDER, 50.0, refine=2)
    # 1000 held, 2000 did not (twice more to confirm); then sqrt(1000 * 2000) = 1414 ->
    # 1400 holds, sqrt(1400 * 2000) = 1673 -> 1700 does not (confirmed).
    assert server.asked == [100, 200, 500, 1000, 2000, 2000, 2000, 1400, 1700, 1700, 1700]
    assert sweep.knee is not None and sweep.knee.rate == 1400
    assert sweep.first_failed is not None and sweep.first_failed.rate == 1700
    assert sweep.stop.startswith("saturated at 2000/s: p99 400.0 ms > 50 ms")
    assert [s.rate for s in sweep.by_rate] == [100, 200, 500, 1000, 1400, 1700, 2000]


def test_errors_end_the_walk_even_with_a_low_p99() -> None:
    def measure(rate: float) -> Step:
        return Step(rate, [result(rate, errors=3 if rate >= 500 else 0)])

    sweep = run_sweep("naive", "unique", measure, LADDER, 50.0, refine=0)
    assert sweep.knee is not None and sweep.knee.rate == 200
    assert "9 errors" in sweep.stop  # three runs of three errors


def test_a_late_rate_is_retried_once() -> None:
    flaky = Server(capacity=10_000, late_at=500, late_times=1)
    sweep = run_sweep("compiled", "unique", flaky.measure, LADDER, 50.0)
    assert flaky.asked == [100, 200, 500, 500, 1000, 2000, 5000]  # retried once, then held
    assert sweep.stop == "every rate up to 5000/s held"
    assert sweep.knee is not None and sweep.knee.rate == 5000


def test_a_generator_at_its_limit_ends_the_sweep_without_a_claim() -> None:
    late = Server(capacity=10_000, late_at=1000, cpu_share=0.95)
    sweep = run_sweep("compiled", "unique", late.measure, LADDER, 50.0)
    assert late.asked == [100, 200, 500, 1000, 1000]
    assert sweep.stop.startswith("generator at its limit at 1000/s: invalid: generator p99 "
                                 "lateness 20.00 ms")
    assert sweep.knee is not None and sweep.knee.rate == 500  # no claim beyond what held


def test_rates_a_busy_machine_made_late_are_not_judged() -> None:
    # Late twice at 500/s (retry included) with the generator mostly idle: other processes
    # held the CPU. The sweep goes on; 500/s neither held nor failed.
    busy = Server(capacity=1500, late_at=500, late_times=2)
    sweep = run_sweep("full", "unique", busy.measure, LADDER, 50.0, refine=0, confirm=0)
    assert busy.asked == [100, 200, 500, 500, 1000, 2000]
    assert sweep.knee is not None and sweep.knee.rate == 1000
    assert sweep.first_failed is not None and sweep.first_failed.rate == 2000
    assert "not judged, the generator was late: 500/s" in sweep.stop


def test_no_rate_held() -> None:
    server = Server(capacity=50)
    sweep = run_sweep("naive", "unique", server.measure, LADDER, 50.0)
    assert server.asked == [100, 100, 100]
    assert sweep.knee is None


def test_one_stall_is_not_taken_for_saturation() -> None:
    server = Server(capacity=1000, stall_at=200)
    sweep = run_sweep("full", "unique", server.measure, LADDER, 50.0, refine=0)
    assert server.asked[:6] == [100, 200, 200, 200, 500, 1000]
    (at_200,) = [s for s in sweep.steps if s.rate == 200]
    assert at_200.holds(50.0) and at_200.spread_ms(99.0) == (5.0, 300.0)
    assert sweep.knee is not None and sweep.knee.rate == 1000


def test_step_figures_are_medians_with_their_spread() -> None:
    step = Step(1000, [result(1000, 1.0, 10.0), result(1000, 3.0, 30.0),
                       result(1000, 2.0, 20.0, timeouts=2)], [0.5, 0.7, None])
    assert (step.p50_ms, step.p99_ms) == (2.0, 20.0)
    assert step.spread_ms(99.0) == (10.0, 30.0)
    assert step.bad == 2 and not step.holds(50.0) and "2 timeouts" in step.why_not(50.0)
    assert step.server_cpu == 0.3  # median of 0.25 and 0.35 cores
    assert step.generator_cpu == 0.1


def test_rates_are_rounded_to_two_digits() -> None:
    assert [nice_rate(x) for x in (1414.2, 173.2, 86.6, 12_247)] == [1400, 170, 87, 12_000]
    assert Sweep("a", "b", 50.0).knee is None


def test_a_step_past_the_bound_at_its_median_needs_no_confirmation() -> None:
    asked: list[float] = []

    def measure(rate: float) -> Step:
        asked.append(rate)
        p50, p99 = (1.0, 5.0) if rate <= 1000 else (300.0, 900.0)  # queueing: all slow
        return Step(rate, [result(rate, p50, p99)])

    sweep = run_sweep("full", "unique", measure, LADDER, 50.0, refine=1)
    assert asked == [100, 200, 500, 1000, 2000, 1400]
    assert sweep.knee is not None and sweep.knee.rate == 1000


def test_confirmations_are_valid_runs() -> None:
    # At 2000/s: a failing run, then a late one (dropped), then two that fail again.
    script = iter([result(2000, p99_ms=400.0), result(2000, lateness_ms=50.0, p99_ms=60.0),
                   result(2000, p99_ms=420.0), result(2000, p99_ms=380.0)])
    asked: list[float] = []

    def measure(rate: float) -> Step:
        asked.append(rate)
        return Step(rate, [next(script) if rate == 2000 else result(rate)])

    sweep = run_sweep("full", "unique", measure, LADDER, 50.0, refine=0)
    assert asked == [100, 200, 500, 1000, 2000, 2000, 2000, 2000]
    (at_2000,) = [s for s in sweep.steps if s.rate == 2000]
    assert len(at_2000.results) == 3 and at_2000.p99_ms == 400.0


def test_a_late_run_within_the_bound_still_shows_the_server_held() -> None:
    # Late by 2 ms with a p99 of 5 ms: invalid as a latency figure, but the server's p99 can
    # only be lower, so the rate held.
    def measure(rate: float) -> Step:
        late = rate == 500
        return Step(rate, [result(rate, p99_ms=5.0 if rate <= 1000 else 400.0,
                                  lateness_ms=2.0 if late else 0.05)])

    sweep = run_sweep("compiled", "unique", measure, LADDER, 50.0, refine=0)
    (at_500,) = [s for s in sweep.steps if s.rate == 500]
    assert not at_500.valid and at_500.holds(50.0) and not at_500.fails(50.0)
    assert [s.rate for s in sweep.steps] == [100, 200, 500, 1000, 2000]
    assert sweep.knee is not None and sweep.knee.rate == 1000


def test_a_step_of_late_and_valid_runs_fails_only_on_what_the_valid_ones_show() -> None:
    valid_past = result(1000, p99_ms=300.0)
    late_past = result(1000, p99_ms=300.0, lateness_ms=40.0)  # an upper bound only
    late_within = result(1000, p99_ms=20.0, lateness_ms=4.0)
    assert Step(1000, [valid_past, valid_past, late_within]).fails(50.0)
    mixed = Step(1000, [valid_past, late_past, late_within])
    assert not mixed.holds(50.0) and not mixed.fails(50.0)  # proves nothing
    assert "generator p99 lateness 40.00 ms" in mixed.why_not(50.0)
    assert Step(1000, [result(1000, errors=1), late_past]).fails(50.0)


def test_two_runs_are_judged_on_the_higher() -> None:
    two = Step(1000, [result(1000, p99_ms=10.0), result(1000, p99_ms=100.0)])
    assert two.p99_ms == 100.0 and two.fails(50.0)
    assert two.why_not(50.0) == "p99 100.0 ms > 50 ms"
