"""``bench.ab``: one short interleaved run of two sides sharing a redis-server, one of them
with two workers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.e2e
@pytest.mark.slow
def test_two_sides_with_redis_and_workers_are_measured_side_by_side(
        session_store: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.ab", "--a", ".", "--b", ".", "--redis", "--workers-b", "2",
         "--model-root", str(session_store), "--scenarios", "v2-json-unique",
         "--repetitions", "1", "--duration", "1", "--warmup", "0", "--connections", "4"],
        capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "(1 worker(s))" in out and "(2 worker(s))" in out and "+ Redis" in out
    (line,) = [s for s in out.splitlines() if s.startswith("v2-json-unique ")]
    assert float(line.split()[-1]) > 0, line
    assert re.search(r"[\d,]+ \[[\d,]+ to [\d,]+\]", line), line


def test_a_setting_without_a_value_is_refused() -> None:
    from bench.ab import main

    with pytest.raises(SystemExit) as exc:
        main(["--a", ".", "--b", ".", "--env-b", "GATEWAY_BATCH"])
    assert exc.value.code == 2
