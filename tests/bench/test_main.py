"""``python -m bench`` against real gateways, wrk, redis-server and the generator: the report
files hold sane numbers; a sweep writes its curve; ``--publish`` copies the report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import parser, publish

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
needs_wrk = pytest.mark.skipif(shutil.which("wrk") is None,
                               reason="wrk missing (make test installs it)")


def _bench(*args: str, timeout: float = 240) -> Path:
    out = Path(args[args.index("--out") + 1])
    proc = subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = out.iterdir()
    return run_dir


@needs_wrk
def test_quick_bench_writes_a_sane_report(tmp_path: Path, session_store: Path) -> None:
    run_dir = _bench("--quick", "--duration", "1", "--configs", "naive,full", "--scenarios",
                     "hot,burst,redis-down,v2-bin-unique", "--connections", "16",
                     "--burst-size", "50", "--model-root", str(session_store),
                     "--out", str(tmp_path / "results"))
    for name in ("results.json", "report.md", "throughput.png", "latency.png"):
        assert (run_dir / name).stat().st_size > 0
    data = json.loads((run_dir / "results.json").read_text())
    rows = {(r["config"], r["scenario"]): r for r in data["rows"]}
    assert set(rows) == {("ceiling", "hot"), ("ceiling", "v2-bin-hot"),
                         ("naive", "hot"), ("naive", "burst"), ("naive", "v2-bin-unique"),
                         ("full", "hot"), ("full", "burst"), ("full", "redis-down"),
                         ("full", "v2-bin-unique")}
    for r in rows.values():
        assert r["rps"] > 0
        if r["scenario"] != "burst":
            assert r["generator_cores"] > 0 and r["server_cores"] > 0
            assert r["p99_ms"] > 0 and r["errors"] == 0
    assert rows[("full", "burst")]["model_calls"] == 1
    assert rows[("naive", "burst")]["model_calls"] == 50
    assert rows[("full", "hot")]["hit_ratio"] > 0.99
    assert rows[("full", "v2-bin-unique")]["rows_per_call"] >= 1
    assert rows[("full", "v2-bin-unique")]["hit_ratio"] == 0  # every row new
    assert rows[("full", "redis-down")]["errors"] == 0
    assert rows[("full", "hot")]["rps"] > rows[("naive", "hot")]["rps"]
    for run in data["runs"]:
        assert run["latency_us"].get("100", 1) > 0  # measured maximum, never 0
    report = (run_dir / "report.md").read_text()
    assert "## Goals" in report and "Machine: " in report and "-t2 -c16" in report
    before, after = data["meta"]["model_limit"]  # the model's own limit, beside the figures
    assert before["model"] == after["model"] == "iris" and before["rows_per_s"] > 0
    assert "**The model's own limit**" in report and "x model limit" in report


def test_sweep_writes_its_curve_and_publishes(tmp_path: Path, session_store: Path) -> None:
    run_dir = _bench("--sweep", "--configs", "ceiling,full", "--scenarios", "v2-json-hot",
                     "--sweep-rates", "100,200", "--duration", "0.5", "--warmup", "0",
                     "--min-requests", "50",
                     "--model-root", str(session_store), "--out", str(tmp_path / "results"),
                     "--publish", str(tmp_path / "docs"))
    data = json.loads((run_dir / "results.json").read_text())
    sweeps = {(s["config"], s["scenario"]): s for s in data["sweeps"]}
    assert set(sweeps) == {("ceiling", "v2-json-hot"), ("full", "v2-json-hot")}
    for s in sweeps.values():
        assert [st["rate"] for st in s["steps"]][:1] == [100]
        for st in s["steps"]:
            assert st["bad"] == 0
            run = st["runs"][0]
            assert run["answered"] == run["sent"] > 0
            assert run["settings"]["rate"] == st["rate"]
    assert data["meta"]["machine"]["cores"] >= 1
    docs = tmp_path / "docs"
    assert sorted(p.name for p in docs.iterdir()) == ["bench-sweep.json", "bench-sweep.md",
                                                     "bench-sweep.png"]
    assert "](bench-sweep.png)" in (docs / "bench-sweep.md").read_text()


def test_publish_renames_and_relinks(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.md").write_text("![throughput](throughput.png)\n![l](latency.png)\n")
    (run / "throughput.png").write_bytes(b"png")
    (run / "latency.png").write_bytes(b"png")
    (run / "results.json").write_text("{}")
    written = publish(run, tmp_path / "docs", sweep=False)
    assert sorted(p.name for p in written) == ["bench-latency.png", "bench-report.json",
                                               "bench-report.md", "bench-throughput.png"]
    assert (tmp_path / "docs" / "bench-report.md").read_text() == (
        "![throughput](bench-throughput.png)\n![l](bench-latency.png)\n")
    publish(run, tmp_path / "docs", sweep=False, prefix="bench-doors-")
    assert "](bench-doors-latency.png)" in (
        tmp_path / "docs" / "bench-doors-report.md").read_text()


def test_groups_expand_and_names_are_checked() -> None:
    args = parser().parse_args(["--scenarios", "hot,doors", "--configs", "ceiling,full"])
    assert args.scenarios[0] == "hot" and "v2-bin-32-unique" in args.scenarios
    assert "multirow" in args.scenarios and len(set(args.scenarios)) == len(args.scenarios)
    with pytest.raises(SystemExit):
        parser().parse_args(["--scenarios", "nope"])
    with pytest.raises(SystemExit):
        parser().parse_args(["--sweep-rates", "100,-5"])


def test_the_grpc_door_is_one_command() -> None:
    args = parser().parse_args(["--scenarios", "grpc", "--mlserver", "--grpc-streams", "4"])
    assert args.scenarios == ("hot", "grpc-hot", "grpc-unique", "grpc-multirow")
    assert args.grpc_streams == 4 and args.mlserver
    args = parser().parse_args(["--scenarios", "grpc-hot", "--grpc-baseline", "10.0.0.1:8001"])
    assert args.grpc_baseline == "10.0.0.1:8001"


@needs_wrk
@pytest.mark.skipif(shutil.which("h2load") is None,
                    reason="h2load missing (scripts/ensure-tools.sh h2load)")
def test_quick_grpc_bench_reports_checked_runs(tmp_path: Path, session_store: Path) -> None:
    # (The generator's own lateness bound is a measurement's safeguard; here, on a machine busy
    # with the rest of the suite, only errors may make a run invalid.)
    run_dir = _bench("--quick", "--duration", "1", "--configs", "full", "--scenarios", "grpc",
                     "--connections", "4", "--grpc-streams", "2", "--max-lateness-ms", "1000",
                     "--model-root", str(session_store), "--out", str(tmp_path / "results"))
    data = json.loads((run_dir / "results.json").read_text())
    rows = {(r["config"], r["scenario"]): r for r in data["rows"]}
    assert {("full", s) for s in ("hot", "grpc-hot", "grpc-unique", "grpc-multirow")} <= set(rows)
    for scenario, generator in (("grpc-hot", "h2load"), ("grpc-unique", "grpc_load"),
                                ("grpc-multirow", "grpc_load")):
        row = rows[("full", scenario)]
        assert row["generator"] == generator and row["errors"] == 0 and row["rps"] > 0
        assert row["generator_cores"] > 0 and row["p99_ms"] > 0
    assert rows[("full", "grpc-multirow")]["rows_per_request"] == 32
    assert rows[("full", "grpc-unique")]["hit_ratio"] == 0  # every row new
    assert all(r["invalid"] is None for r in data["runs"] if r["scenario"].startswith("grpc"))
    checks = {c["name"] for c in data["checks"]}
    assert "grpc-hot: full vs its own REST GET /predict hot" in checks


def test_the_heavy_workload_is_one_command() -> None:
    args = parser().parse_args(["--model", "lgbm-heavy", "--scenarios", "heavy", "--mlserver",
                                "--mlserver-batch", "32,5", "--open-loop-at", "0.5"])
    assert args.scenarios == ("unique", "zipf", "multirow", "burst", "v2-json-unique",
                              "v2-json-32-unique")
    assert args.mlserver and args.mlserver_batch == (32, 0.005)
    assert args.open_loop_at == (0.5,)
    with pytest.raises(SystemExit):
        parser().parse_args(["--mlserver-batch", "64"])
