"""``python -m bench --quick`` against real gateways, wrk, redis-server: report files hold
sane numbers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk missing (make test installs it)")
def test_quick_bench_writes_a_sane_report(tmp_path: Path, session_store: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--duration", "2",
         "--configs", "naive,full", "--scenarios", "hot,unique,burst,redis-down",
         "--connections", "16", "--burst-size", "50",
         "--model-root", str(session_store), "--out", str(out)],
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = out.iterdir()
    for name in ("results.json", "report.md", "throughput.png", "latency_cdf.png"):
        assert (run_dir / name).stat().st_size > 0
    data = json.loads((run_dir / "results.json").read_text())
    rows = {(r["config"], r["scenario"]): r for r in data["rows"]}
    assert set(rows) == {("ceiling", "hot"), ("naive", "hot"), ("naive", "unique"),
                         ("naive", "burst"), ("full", "hot"), ("full", "unique"),
                         ("full", "burst"), ("full", "redis-down")}
    for r in rows.values():
        assert r["rps"] > 0
    assert rows[("full", "burst")]["model_calls"] == 1
    assert rows[("naive", "burst")]["model_calls"] == 50
    assert rows[("full", "hot")]["hit_ratio"] > 0.99
    assert rows[("full", "unique")]["rows_per_call"] >= 1
    assert rows[("full", "redis-down")]["errors"] == 0
    assert rows[("full", "hot")]["rps"] > rows[("naive", "hot")]["rps"]
    assert "## Goals" in (run_dir / "report.md").read_text()
