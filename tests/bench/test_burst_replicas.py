"""``python -m bench.burst_replicas``: one small run over three replicas, read from its JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import burst_replicas

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_three_replicas_one_call_per_burst_with_remote_coalescing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "burst.json"
    burst_replicas.main(["--replicas", "3", "--repetitions", "1", "--burst", "30",
                         "--rows", "10", "--json", str(out)])
    results = {r["remote"]: r for r in json.loads(out.read_text())}
    assert results["auto"]["calls_per_identical_burst"] == [1]
    assert results["auto"]["rows_per_distinct_burst"] == [10]
    assert 1 <= results["off"]["calls_per_identical_burst"][0] <= 3
    assert all(r["wrong_answers"] == 0 for r in results.values())
    assert "| 3 | auto | 1.00 (1-1) |" in capsys.readouterr().out
