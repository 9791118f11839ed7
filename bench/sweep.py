"""Latency against offered load: one target at rising fixed rates until it saturates.

A step is one rate (one or more repetitions of ``bench.loadgen``). Measured latency is the
server's plus the generator's lateness, so it bounds the server's from above: a step *holds*
when every request got a 2xx answer and the median p99 is within the bound, whether or not
the generator kept its schedule. It *fails* when runs of a generator that kept its schedule
(valid ones) show it: one got a request without a 2xx answer, or at least half of all the
step's runs are valid and past the bound. A step that is neither (the generator was late,
and the p99 is past the bound) is measured again, ``retries`` times; if it stays so, it
proves nothing: when the generator used most of a core (``GENERATOR_LIMIT``) it has reached
its own limit and the sweep stops there, claiming nothing above; otherwise other processes
held the CPU, and the sweep goes on up the ladder.

A step that fails while its median request was within the bound (p50 under it: the excess
may be one stall, a collector pause or another process on the CPU, in one short run) is
measured until it has ``confirm`` more conclusive runs, and judged on all of them (the
median p99); a step whose p50 is past the bound too is saturated beyond doubt. The sweep
walks up the ladder and stops at the first step that fails; then it bisects (geometrically)
between the last step that held and that one, ``refine`` times. The *knee* is the highest
rate that held below the first that failed: the capacity at that p99 bound.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.loadgen import Result

__all__ = ["GENERATOR_LIMIT", "LADDER", "Step", "Sweep", "nice_rate", "run_sweep"]

GENERATOR_LIMIT = 0.8  # generator CPU share from which an invalid step means its own limit

LADDER: tuple[float, ...] = (100, 200, 500, 1000, 2000, 5000, 10000, 20000, 30000)


@dataclass
class Step:
    """One offered rate: the generator's results (one per repetition) and the server's CPU
    seconds per repetition (None when the server was not started by the bench)."""

    rate: float
    results: list[Result]
    server_cpu_s: list[float | None] = field(default_factory=list)

    def _ms(self, p: float) -> list[float]:
        return [r.latency_us[p] / 1000 for r in self.results]

    @property
    def p50_ms(self) -> float:
        """Median over the repetitions (the higher middle one of an even count)."""
        return float(statistics.median_high(self._ms(50.0)))

    @property
    def p99_ms(self) -> float:
        """Median over the repetitions (the higher middle one of an even count)."""
        return float(statistics.median_high(self._ms(99.0)))

    def spread_ms(self, p: float) -> tuple[float, float]:
        values = self._ms(p)
        return min(values), max(values)

    @property
    def bad(self) -> int:
        """Requests without a 2xx answer, over all repetitions."""
        return sum(r.bad for r in self.results)

    @property
    def valid(self) -> bool:
        return all(r.valid for r in self.results)

    @property
    def generator_cpu(self) -> float:
        """Median generator CPU share (1.0 = one core)."""
        return float(statistics.median(r.cpu_share for r in self.results))

    @property
    def server_cpu(self) -> float | None:
        """Median server CPU share over the measured windows (cores), when known."""
        shares = [c / r.wall_s for c, r in zip(self.server_cpu_s, self.results, strict=False)
                  if c is not None and r.wall_s]
        return float(statistics.median(shares)) if shares else None

    def holds(self, bound_ms: float) -> bool:
        """Every answer 2xx and the median p99 within the bound (an upper bound of the
        server's when the generator was late, so conclusive either way)."""
        return self.bad == 0 and self.p99_ms <= bound_ms

    def fails(self, bound_ms: float) -> bool:
        """Does not hold, and runs of a generator that kept its schedule show it: one with
        a request without a 2xx answer, or at least half past the bound (a late run's
        latency is only an upper bound, so it cannot show a failure)."""
        if self.holds(bound_ms):
            return False
        valid = [r for r in self.results if r.valid]
        past = sum(1 for r in valid if r.latency_us[99.0] / 1000 > bound_ms)
        return any(r.bad for r in valid) or 2 * past >= len(self.results)

    def why_not(self, bound_ms: float) -> str:
        """Why the step does not hold ('' when it does)."""
        if self.holds(bound_ms):
            return ""
        late = [r.verdict for r in self.results if not r.valid]
        if late and not self.fails(bound_ms):
            return late[0]
        if self.bad:
            kinds = {"errors": sum(r.errors for r in self.results),
                     "failures": sum(r.failures for r in self.results),
                     "timeouts": sum(r.timeouts for r in self.results)}
            return ", ".join(f"{v} {k}" for k, v in kinds.items() if v)
        if self.p99_ms > bound_ms:
            return f"p99 {self.p99_ms:.1f} ms > {bound_ms:g} ms"
        return ""

    def to_json(self) -> dict[str, Any]:
        return {"rate": self.rate, "p50_ms": self.p50_ms, "p99_ms": self.p99_ms,
                "bad": self.bad, "valid": self.valid, "generator_cpu": self.generator_cpu,
                "server_cpu": self.server_cpu, "runs": [r.to_json() for r in self.results],
                "server_cpu_s": self.server_cpu_s}


@dataclass
class Sweep:
    """The steps of one target and scenario, in the order measured."""

    config: str
    scenario: str
    bound_ms: float
    steps: list[Step] = field(default_factory=list)
    stop: str = ""  # why the sweep ended

    @property
    def by_rate(self) -> list[Step]:
        return sorted(self.steps, key=lambda s: s.rate)

    @property
    def first_failed(self) -> Step | None:
        """The lowest rate that failed (valid, and did not hold)."""
        return next((s for s in self.by_rate if s.fails(self.bound_ms)), None)

    @property
    def knee(self) -> Step | None:
        """The highest rate that held below the first that did not (None: none held)."""
        failed = self.first_failed
        held = [s for s in self.by_rate if s.holds(self.bound_ms)
                and (failed is None or s.rate < failed.rate)]
        return held[-1] if held else None

    def to_json(self) -> dict[str, Any]:
        knee = self.knee
        return {"config": self.config, "scenario": self.scenario, "bound_ms": self.bound_ms,
                "stop": self.stop, "knee_rate": knee.rate if knee else None,
                "steps": [s.to_json() for s in self.steps]}


def nice_rate(rate: float) -> float:
    """``rate`` rounded to two significant digits."""
    if rate <= 0:
        return rate
    digits = 1 - math.floor(math.log10(rate))
    return float(round(rate, digits))


def run_sweep(config: str, scenario: str, measure: Callable[[float], Step],
              ladder: Sequence[float], bound_ms: float, *, refine: int = 3,
              retries: int = 1, confirm: int = 2) -> Sweep:
    """Measure ``ladder`` rates in order until one fails, then bisect ``refine`` times
    between it and the last that held. An invalid step is measured again up to ``retries``
    times; a failing one with its p50 within the bound gets ``confirm`` more valid runs
    (within ``confirm * (1 + retries)`` attempts)."""
    sweep = Sweep(config, scenario, bound_ms)

    def conclusive(s: Step) -> bool:
        return s.holds(bound_ms) or s.fails(bound_ms)

    def step(rate: float) -> Step:
        s = measure(rate)
        for _ in range(retries):
            if conclusive(s):
                break
            s = measure(rate)
        if s.fails(bound_ms) and s.p50_ms <= bound_ms:
            wanted = len(s.results) + confirm
            for _ in range(confirm * (1 + retries)):
                if len(s.results) >= wanted:
                    break
                more = measure(rate)
                if conclusive(more):
                    s = Step(rate, s.results + more.results,
                             s.server_cpu_s + more.server_cpu_s)
        sweep.steps.append(s)
        return s

    last_ok: float | None = None
    failed: Step | None = None
    invalid: list[float] = []
    for rate in ladder:
        s = step(rate)
        if s.holds(bound_ms):
            last_ok = rate
            continue
        if s.fails(bound_ms):
            failed = s
            break
        if s.generator_cpu >= GENERATOR_LIMIT:
            sweep.stop = f"generator at its limit at {rate:g}/s: {s.why_not(bound_ms)}"
            return sweep
        invalid.append(rate)
    noted = (f" (not judged, the generator was late: "
             f"{', '.join(f'{r:g}' for r in invalid)}/s)" if invalid else "")
    if failed is None:
        sweep.stop = f"every rate up to {ladder[-1]:g}/s held{noted}"
        return sweep
    sweep.stop = f"saturated at {failed.rate:g}/s: {failed.why_not(bound_ms)}{noted}"
    if last_ok is None:
        return sweep
    lo, hi = last_ok, failed.rate
    for _ in range(refine):
        mid = nice_rate(math.sqrt(lo * hi))
        if not lo < mid < hi:
            break
        s = step(mid)
        if s.holds(bound_ms):
            lo = mid
        elif s.fails(bound_ms):
            hi = mid
        else:
            break
    return sweep
