"""Tasks for ``model_store.child`` in the tests: each does one thing a real task may do."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any


def answer(value: int) -> dict[str, Any]:
    print("noise a library prints")  # must not spoil the answer
    return {"value": value * 2}


def refuse(why: str) -> dict[str, Any]:
    raise ValueError(why + "\nsecond line")


def fail() -> dict[str, Any]:
    raise RuntimeError("a bug, not a refusal")


def abort(**_: Any) -> dict[str, Any]:
    os.abort()


def hang(pid_file: str) -> dict[str, Any]:
    """Starts a grandchild that would outlive us, says where it is, then never answers."""
    grandchild = subprocess.Popen([sys.executable, "-c", "import threading; "
                                   "threading.Event().wait()"])
    Path(pid_file).write_text(str(grandchild.pid))
    threading.Event().wait()
    return {}
