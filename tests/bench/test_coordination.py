from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench.coordination import main


@pytest.mark.e2e  # its own redis-server
def test_prints_what_coordinating_a_block_costs(session_store: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Every row of every round is leased (the tool fails otherwise), then the cost printed."""
    main(["--model-root", str(session_store), "--rows", "8", "--blocks", "20", "--repeats", "2"])
    out = capsys.readouterr().out
    assert re.fullmatch(r"iris: coordinating 8-row blocks costs the event loop \d+ us a block "
                        r"\(\d+\.\.\d+\), \d+\.\d us a row; redis-server \d+ us a block\n", out)
