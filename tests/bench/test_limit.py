"""The model's own limit: measured as the gateway calls the model, and carried by the report."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from bench.heavy import ensure_heavy
from bench.limit import Limit, busy_cores, main, measure
from bench.report import (
    aggregate,
    aggregate_open,
    heavy_checks,
    limit_of,
    to_markdown,
    write_report,
)
from bench.runner import CEILING, OpenRun, Run
from bench.scrape import Counters
from model_store import ModelStore
from model_store.boosters import LIGHTGBM_C_API, LIGHTGBM_ONE_ROW
from tests.bench.test_heavy import TINY
from tests.bench.test_report import META
from tests.bench.test_sweep import result


def test_the_limit_times_the_served_backend(session_store: Path) -> None:
    limit = measure(session_store, "iris", rows=64, calls=3, repeats=2)
    assert (limit.model, limit.version, limit.rows) == ("iris", 1, 64)
    assert limit.threads is None  # not a setting of a scikit-learn model
    assert "label=sklearn" in limit.backend and "probabilities=sklearn" in limit.backend
    assert limit.call_us_min <= limit.call_us <= limit.call_us_max
    assert limit.rows_per_s == pytest.approx(64 / limit.call_us * 1e6)
    assert limit.rows_per_s_min <= limit.rows_per_s <= limit.rows_per_s_max
    assert Limit.from_json(limit.to_json()) == limit


@pytest.mark.e2e  # the store checks a booster file in a child process
def test_a_boosters_limit_runs_its_library_with_the_versions_threads(tmp_path: Path) -> None:
    ensure_heavy(tmp_path, "tiny-xgb", TINY["xgboost"], backend="library")
    ModelStore(tmp_path).configure("tiny-xgb", 1, {"threads": 2})
    limit = measure(tmp_path, "tiny-xgb", rows=8, calls=2, repeats=1)
    assert limit.threads == 2
    assert "label=xgboost" in limit.backend and "probabilities=xgboost" in limit.backend
    assert "a lone row" not in limit.backend  # one call whatever the rows
    ensure_heavy(tmp_path, "tiny-lgbm", TINY["lightgbm"], backend="library")
    limit = measure(tmp_path, "tiny-lgbm", rows=1, calls=2, repeats=1)
    assert (f"probabilities=lightgbm {LIGHTGBM_C_API} (a lone row: {LIGHTGBM_ONE_ROW})"
            in limit.backend)


def test_the_limit_command_prints_one_line(session_store: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model-root", str(session_store), "--model", "iris", "--calls", "2",
                 "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("iris v1 (label=sklearn") and "rows/s" in out


@pytest.mark.e2e  # starts processes
def test_the_limit_command_measures_again_beside_busy_cores(
        session_store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model-root", str(session_store), "--model", "iris", "--calls", "2",
                 "--repeats", "1", "--beside-busy"]) == 0
    alone, beside = capsys.readouterr().out.splitlines()
    assert alone.startswith("iris v1 (label=sklearn")
    assert beside.startswith("beside ") and " core(s) busy in plain Python: iris v1" in beside
    assert beside.endswith("x as long")


@pytest.mark.e2e  # starts processes
def test_busy_cores_run_for_the_block_and_end_with_it() -> None:
    with busy_cores(2, seconds=60) as pids:
        assert len(pids) == 2
        for pid in pids:  # running (R) or runnable, not ended
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            assert state in ("R", "S")
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()


def test_arguments_are_checked(session_store: Path) -> None:
    with pytest.raises(ValueError):
        measure(session_store, "iris", rows=0)


# 64 rows in 8 ms: 8,000 rows/s; a 64-row call of 8 ms.
LIMIT = Limit("m", 1, "label=lightgbm Booster.predict", 1, 64, 8000.0, 7000.0, 9000.0, 200.0,
              50, 5)


def _run(config: str, scenario: str, rps: float, rows: int = 1, p99_us: int = 10_000,
         calls: float = 10) -> Run:
    return Run(config, scenario, 0, int(rps * 2), 2.0, 0,
               {50.0: 1000, 90.0: 2000, 99.0: p99_us, 100.0: p99_us},
               Counters(model_calls=calls, model_rows=calls * 10), threads=2,
               connections=64, rows=rows)


RUNS = [
    _run(CEILING, "hot", 9000),
    _run("compiled", "v2-json-unique", 3000, p99_us=15_000),
    _run("baseline", "v2-json-unique", 500),
    _run("compiled", "v2-json-32-unique", 200, rows=32),
    Run("compiled", "burst", 0, 200, 0.05, 0, {}, Counters(model_calls=1, model_rows=1)),
]


def test_every_throughput_stands_beside_the_models_limit() -> None:
    rows = {(r.config, r.scenario): r for r in aggregate(RUNS, LIMIT)}
    assert rows[("compiled", "v2-json-32-unique")].rows_per_s == 6400
    assert rows[("compiled", "v2-json-32-unique")].vs_limit == pytest.approx(0.8)
    assert rows[("baseline", "v2-json-unique")].vs_limit == pytest.approx(500 / 8000)
    assert rows[(CEILING, "hot")].vs_limit is None  # runs no model
    assert rows[("compiled", "burst")].vs_limit is None  # not a throughput
    assert all(r.vs_limit is None for r in aggregate(RUNS))


def test_the_heavy_goals_are_judged_against_the_baseline_and_the_limit() -> None:
    open_runs = [OpenRun("compiled", "v2-json-unique", 0,
                         result(1500, p50_ms=2.0, p99_ms=30.0))]
    rows = aggregate(RUNS, LIMIT)
    got = {c.name: c for c in heavy_checks(rows, aggregate_open(open_runs), LIMIT)}
    assert got["v2-json-unique: gateway rows/s vs the baseline's"].passed  # 6x
    assert got["v2-json-unique: gateway p99 (closed loop)"].passed  # 15 ms
    assert got["v2-json-32-unique: gateway rows/s vs the model's own limit"].passed  # 0.8x
    assert got["burst: model calls for N identical new rows"].passed
    half = got["v2-json-unique: p99 at 50% of capacity (1,500/s) vs 5x the 64-row call"]
    assert half.target == "<= 40.0 ms" and half.passed  # 30 ms


def test_ratios_are_taken_against_the_faster_of_the_two_limits() -> None:
    """The limit measured before the servers and after them differ on a shared machine: the
    faster one (the stricter verdict) is the one the ratios use, in either order."""
    slow = replace(LIMIT, call_us=LIMIT.call_us * 2)
    for pair in ([slow, LIMIT], [LIMIT, slow]):
        got = limit_of({"model_limit": [x.to_json() for x in pair]})
        assert got is not None and got.rows_per_s == LIMIT.rows_per_s
    assert limit_of({}) is None
    text = to_markdown(aggregate(RUNS, LIMIT), [], {**META, "model_limit": [
        slow.to_json(), LIMIT.to_json()]})
    assert "taken against the faster of the two" in text


def test_the_report_heads_with_the_limit_and_carries_it(tmp_path: Path) -> None:
    meta = {**META, "model_limit": [LIMIT.to_json(), LIMIT.to_json()],
            "baseline": "MLServer 1.7.1"}
    rows = aggregate(RUNS, LIMIT)
    text = to_markdown(rows, [], meta)
    assert "**The model's own limit**" in text and "8,000 rows/s" in text
    assert "Baseline: MLServer 1.7.1." in text
    assert "x model limit" in text and "| rows/s |" in text
    write_report(tmp_path, RUNS, meta)
    assert "8,000 rows/s" in (tmp_path / "report.md").read_text()
    assert '"model_limit"' in (tmp_path / "results.json").read_text()
