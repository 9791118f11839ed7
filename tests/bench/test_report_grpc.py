"""The report's gRPC side: invalid runs are no throughput, and the gRPC door's goals."""

from __future__ import annotations

import pytest

from bench.report import aggregate, columns, grpc_checks, table_cells, to_markdown
from bench.runner import Run
from tests.bench.test_report import META


def _grpc(config: str, scenario: str, rps: float, rep: int = 0, invalid: str | None = None,
          generator: str = "h2load") -> Run:
    return Run(config, scenario, rep, int(rps * 2), 2.0, 0 if invalid is None else 7,
               {50.0: 1000, 90.0: 2000, 99.0: 3000, 100.0: 9000}, generator_cpu_s=0.2,
               threads=1, connections=64, generator=generator, streams=8,
               lateness_p99_us=None if generator == "h2load" else 400, invalid=invalid)


RUNS = [
    Run("full", "hot", 0, 41_000, 2.0, 0, {50.0: 1000, 99.0: 3000}, threads=2,
        connections=64),
    _grpc("full", "grpc-hot", 7000, 0), _grpc("full", "grpc-hot", 1, 1, "7 calls failed"),
    _grpc("full", "grpc-hot", 5000, 2),
    _grpc("full", "grpc-unique", 3000, generator="grpc_load"),
    _grpc("baseline", "grpc-hot", 400),
    _grpc("baseline", "grpc-unique", 100, 0, "calls failed: 3 x UNAVAILABLE", "grpc_load"),
]


def test_invalid_runs_are_left_out_and_a_row_of_them_has_no_figures() -> None:
    rows = {(r.config, r.scenario): r for r in aggregate(RUNS)}
    hot = rows[("full", "grpc-hot")]
    assert (hot.rps, hot.rps_min, hot.rps_max, hot.reps) == (6000, 5000, 7000, 2)  # valid
    assert hot.invalid == 1 and hot.why_invalid == "7 calls failed"
    assert hot.vs_baseline == pytest.approx(15.0)
    dead = rows[("baseline", "grpc-unique")]
    assert dead.rps == 0 and dead.p99_ms is None and dead.invalid == 1
    assert rows[("full", "grpc-unique")].vs_baseline is None  # nothing to compare with
    cols = columns(list(rows.values()))
    assert "generator" in cols
    cells = dict(zip(cols, table_cells(dead, cols), strict=True))
    assert cells["req/s (min-max)"] == "invalid: calls failed: 3 x UNAVAILABLE"
    assert cells["errors"] == "7 (1 invalid)"
    unique = dict(zip(cols, table_cells(rows[("full", "grpc-unique")], cols), strict=True))
    assert unique["generator"] == "grpc_load x8, late p99 0.40 ms"


def test_the_grpc_goals_are_judged_only_on_valid_rows() -> None:
    rows = aggregate(RUNS)
    got = {c.name: c for c in grpc_checks(rows, "full")}
    assert set(got) == {"grpc-hot: full vs the baseline's gRPC",
                        "grpc-hot: full vs its own REST GET /predict hot"}
    assert got["grpc-hot: full vs the baseline's gRPC"].passed  # 6000 / 400 = 15x
    rest = got["grpc-hot: full vs its own REST GET /predict hot"]
    assert rest.passed is False and rest.measured.startswith("0.29x")  # 6000 / 20500
    text = to_markdown(rows, grpc_checks(rows, "full"), {**META, "grpc_streams": 8})
    assert "64 connections x 8 streams" in text and "invalid" in text
