"""Report math: medians, spreads, ratios, goals, and the tables that print them."""

from __future__ import annotations

import re

import pytest

from bench.report import (
    aggregate,
    aggregate_open,
    checks,
    columns,
    sweep_markdown,
    table_cells,
    to_markdown,
)
from bench.runner import CEILING, OpenRun, Run
from bench.scrape import Counters
from bench.sweep import Step, Sweep
from tests.bench.test_sweep import result

META = {"timestamp": "t", "command": "python -m bench", "duration_s": 2, "warmup_s": 0,
        "repetitions": 3, "connections": 64, "wrk_version": "wrk 4.1.0",
        "machine": {"cores": 2, "cpu_model": "AMD EPYC", "load_average": [0.5, 0.4, 0.3],
                    "python": "3.11", "os": "Linux"},
        "machine_after": {"load_average": [0.7, 0.5, 0.3]},
        "open_loop_generator": {"connections": 16, "max_connections": 512, "warmup_s": 0.5,
                                "duration_s": 2, "repetitions": 3, "max_lateness_ms": 1.0}}


def _run(config: str, scenario: str, rps: float, rep: int = 0, p50: int = 1000,
         calls: float = 10, rows: float = 20) -> Run:
    return Run(config, scenario, rep, int(rps * 2), 2.0, 0,
               {50.0: p50, 90.0: p50 * 2, 99.0: p50 * 3, 100.0: p50 * 9},
               Counters(model_calls=calls, model_rows=rows, hits=5, lookups=10),
               generator_cpu_s=1.0 + rep, server_cpu_s=2.0, threads=2, connections=64)


RUNS = [
    _run(CEILING, "hot", 1000),
    _run("naive", "unique", 100, 0), _run("naive", "unique", 300, 1),
    _run("naive", "unique", 200, 2, p50=4000),
    _run("full", "unique", 2500, 0), _run("full", "unique", 2000, 1),
    _run("full", "unique", 3000, 2),
    _run("full", "hot", 600),
    _run("baseline", "unique", 500),
    Run("full", "burst", 0, 200, 0.05, 0, {}, Counters(model_calls=1, model_rows=1)),
]


def test_report_math_medians_spreads_and_ratios() -> None:
    rows = {(r.config, r.scenario): r for r in aggregate(RUNS)}
    naive, full = rows[("naive", "unique")], rows[("full", "unique")]
    assert (naive.rps, naive.rps_min, naive.rps_max) == (200, 100, 300)
    assert naive.p50_ms == 1.0 and naive.p99_ms == 3.0
    assert (naive.p50_min, naive.p50_max, naive.p99_max) == (1.0, 4.0, 12.0)
    assert full.vs_naive == pytest.approx(12.5)
    assert full.vs_baseline == pytest.approx(5.0)
    assert rows[("full", "hot")].vs_ceiling == pytest.approx(0.6)
    assert rows[("full", "burst")].vs_ceiling is None  # a burst is not a throughput
    assert full.rows_per_call == pytest.approx(2.0) and full.hit_ratio == pytest.approx(0.5)
    assert full.generator_cores == pytest.approx(1.0)  # median of 0.5, 1.0, 1.5 cores
    assert full.server_cores == pytest.approx(1.0)
    assert (full.threads, full.connections) == (2, 64)


def test_tables_put_ratios_first_and_show_every_spread() -> None:
    rows = aggregate(RUNS)
    cols = columns(rows)
    assert cols[:5] == ("config", "scenario", "x ceiling", "x naive", "x baseline")
    assert cols.index("req/s (min-max)") > cols.index("x baseline")
    assert "x baseline" not in columns([r for r in rows if r.config != "baseline"
                                        and r.scenario != "unique"])
    verdicts = {c.name: c.passed for c in checks(rows)}
    assert verdicts["unique: full vs naive throughput"] is True
    assert verdicts["hot: full vs bare-endpoint ceiling"] is True
    assert verdicts["burst: model calls for N identical new rows"] is True
    md = to_markdown(rows, checks(rows), META)
    full = next(r for r in rows if (r.config, r.scenario) == ("full", "unique"))
    cells = table_cells(full, cols)
    # each ratio with the row's min and max over the reference's median
    assert cells[:5] == ["full", "unique", "2.50 (2.00..3.00)", "12.5 (10.0..15.0)",
                         "5.00 (4.00..6.00)"]
    assert "2,500 (2,000..3,000)" in cells and "1.00" in cells
    assert "| " + " | ".join(cells) + " |" in md
    assert re.search(r"\| unique: full vs naive throughput \| >= 10x \| 12\.5x \| met \|", md)
    assert "2 cores (AMD EPYC), 1-minute load average 0.5 at start, 0.7 at the end" in md
    assert "wrk 4.1.0 -t2 -c64, 2 s runs after 0 s warm-up, 3 repetition(s)" in md
    # ratios first: a table per ratio, scenarios down, configurations across
    assert md.index("## Ratios") < md.index("## Figures")
    assert "| scenario | ceiling | naive | full | baseline |" in md  # x ceiling
    assert "| unique | - | 0.20 (0.10..0.30) | 2.50 (2.00..3.00) | 0.50 |" in md
    assert "| unique | 1.00 (0.50..1.50) | 12.5 (10.0..15.0) |" in md  # x naive
    assert "| unique | 0.40 (0.20..0.60) | 5.00 (4.00..6.00) |" in md  # x baseline


def _open(config: str, rate: float, p50_ms: float, rep: int, **kw: float) -> OpenRun:
    return OpenRun(config, "unique", rep, result(rate, p50_ms, p50_ms * 5, **kw),
                   server_cpu_s=1.0)


def test_open_loop_rows_and_validity() -> None:
    rows = aggregate_open([_open("full", 400, 1.0, 0), _open("full", 400, 3.0, 1),
                           _open("full", 400, 9.0, 2, lateness_ms=10.0)])
    (row,) = rows
    # the late repetition (p50 9 ms) measured the generator: left out of the latencies
    assert (row.p50_ms, row.p50_min, row.p50_max, row.p99_ms) == (2.0, 1.0, 3.0, 10.0)
    assert (row.reps, row.valid, row.lateness_p99_ms) == (3, 2, 10.0)
    assert row.generator_cpu == pytest.approx(0.1) and row.server_cores == pytest.approx(0.5)
    from bench.report import open_markdown

    text = "\n".join(open_markdown(rows, META))
    assert "| full | unique | 400 | 2/3 | 2.00 (1.00..3.00) | 10.00 (5.00..15.00) | 0 | 10.00 |" \
        in text
    late = aggregate_open([_open("full", 800, 9.0, 0, lateness_ms=10.0)])
    assert "| full | unique | 800 | 0/1 | <= 9.00 | <= 45.00 |" in "\n".join(
        open_markdown(late, META))
    assert ("a run is invalid when its p99 send lateness exceeds 1 ms and 10% of its p99 "
            "latency") in text


def test_sweep_table_gives_capacity_at_the_bound_with_ratios_first() -> None:
    def sweep(config: str, held: list[float], failed: float) -> Sweep:
        s = Sweep(config, "unique", 50.0, stop=f"saturated at {failed:g}/s")
        s.steps = [Step(r, [result(r, 1.0, 5.0)]) for r in held]
        s.steps.append(Step(failed, [result(failed, 30.0, 400.0)]))
        return s

    md = sweep_markdown([sweep(CEILING, [1000, 10000], 20000), sweep("naive", [100], 200),
                         sweep("full", [100, 1000, 3000], 5000)], META, {"curve": "sweep.png"})
    assert "| full | unique | 30.0 | 0.30 | 3,000 | 1.00 | 5.00 |" in md
    assert "| naive | unique | 1.0 | 0.01 | 100 |" in md
    never = Sweep("naive", "unique", 50.0, steps=[
        Step(100, [result(100, p99_ms=60.0, lateness_ms=9.0)]),  # late: proves nothing
        Step(200, [result(200, 30.0, 400.0)])])
    assert "| naive | unique | - | - | < 200 |" in sweep_markdown([never], META)
    late_but_held = Sweep("full", "unique", 50.0, steps=[
        Step(100, [result(100, 1.0, 5.0, lateness_ms=2.0)]),
        Step(200, [result(200, 30.0, 400.0)])])
    assert "| full | unique | - | - | 100 | <= 1.00 | <= 5.00 |" in sweep_markdown(
        [late_but_held], META)
    assert "| full | unique | 5,000 | no: p99 400.0 ms > 50 ms |" in md
    assert "![curve](sweep.png)" in md
