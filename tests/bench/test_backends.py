"""``python -m bench.backends`` times both backends of a stored model."""

from __future__ import annotations

import re

from bench.backends import main


def test_backend_timing_command(compiled_store, session_store, capsys) -> None:
    assert main(["--model-root", str(compiled_store), "--calls", "3"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\s+1\s+\d+\s+\d+\s+\d+x$", out, re.M), out
    assert re.search(r"^\s+64\s+\d+\s+\d+\s+\d+x$", out, re.M), out
    assert main(["--model-root", str(session_store), "--calls", "3"]) == 0
    assert "(not compiled)" in capsys.readouterr().out
