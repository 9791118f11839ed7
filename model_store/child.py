"""Work that may crash or run long, in a child process: ``run(task, arguments, timeout_s=...)``.

A booster file from outside can crash xgboost or lightgbm (SIGSEGV, abort) where a Python
exception was expected, and turning a model into C and compiling it can take minutes. ``run``
starts ``python -m model_store.child`` in a session (and process group) of its own, hands it
one task (``"module:function"``, imported in the child only) and its keyword arguments as JSON
on stdin, and waits at most ``timeout_s``:

* the task's answer (a JSON object) is returned;
* a task that refuses its input raises a ``ValueError`` in the child (``BoosterError`` is one);
  ``run`` raises ``ChildFailed`` with that one-line message;
* a child killed by a signal (a crash), or one that exits otherwise without an answer, raises
  ``ChildFailed`` naming the signal or the last line it wrote to stderr (``crashed`` is set);
* a child still running after ``timeout_s`` is killed with its whole process group (the
  compilers it started too) and ``ChildFailed`` is raised (``timed_out`` is set).

In every case the process group is killed before ``run`` returns or raises, so nothing it
started outlives it. A task takes JSON values as keyword arguments and returns a JSON object.
The child writes its answer on its own copy of stdout: anything the libraries print goes to
stderr.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["ChildFailed", "run"]

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])
_STDERR_KEPT = 4_000


class ChildFailed(Exception):
    """The task gave no answer: it refused its input, crashed, or ran out of time. The message
    is one line."""

    def __init__(self, message: str, *, crashed: bool = False, timed_out: bool = False) -> None:
        super().__init__(message)
        self.crashed = crashed
        self.timed_out = timed_out


def run(task: str, arguments: Mapping[str, Any], *, timeout_s: float) -> dict[str, Any]:
    """``task(**arguments)`` in a child process, ``task`` being ``"module:function"``; see
    the module docstring. Raises ChildFailed."""
    if task.count(":") != 1:
        raise ValueError(f"a task is 'module:function', got {task!r}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    request = json.dumps({"task": task, "arguments": dict(arguments)}).encode()
    with subprocess.Popen([sys.executable, "-m", "model_store.child"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                          start_new_session=True) as proc:  # its pipes closed on the way out
        try:
            out, err = proc.communicate(request, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise ChildFailed(f"took longer than {timeout_s:g} s and was stopped",
                              timed_out=True) from None
        except BaseException:
            _kill_group(proc)
            raise
        _kill_group(proc)  # what a crashed child left running
    return _answer(proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _answer(returncode: int, out: bytes, err: bytes) -> dict[str, Any]:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        raise ChildFailed(f"crashed (killed by {name})", crashed=True)
    lines = out.decode(errors="replace").strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else None
    except ValueError:
        answer = None
    if returncode != 0 or not isinstance(answer, dict):
        tail = [line for line in err.decode(errors="replace")[-_STDERR_KEPT:].splitlines()
                if line.strip()]
        why = tail[-1].strip()[:300] if tail else "no answer"
        raise ChildFailed(f"failed (exit status {returncode}): {why}", crashed=True)
    if "error" in answer:
        raise ChildFailed(str(answer["error"]))
    result: dict[str, Any] = answer.get("ok", {})
    return result


def _main() -> int:
    answer_fd = os.dup(1)
    os.dup2(2, 1)  # whatever the libraries print goes to stderr, not into the answer
    request = json.loads(sys.stdin.buffer.read())
    module, _, name = request["task"].partition(":")
    function = getattr(importlib.import_module(module), name)
    try:
        answer: dict[str, Any] = {"ok": function(**request["arguments"])}
    except ValueError as exc:  # the task's own refusal of its input
        lines = str(exc).strip().splitlines()
        answer = {"error": lines[0] if lines else type(exc).__name__}
    with os.fdopen(answer_fd, "w") as f:
        f.write(json.dumps(answer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
