from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench.door_cpu import main


def test_prints_the_time_per_cached_request(session_store: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    main(["--model-root", str(session_store), "--runs", "2", "--requests", "20"])
    out = capsys.readouterr().out
    assert re.fullmatch(r"best \d+\.\d\d us, median \d+\.\d\d us per request\n", out)
