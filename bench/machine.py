"""The machine a figure was measured on, and CPU time of processes by PID (Linux ``/proc``)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["describe", "process_cpu_s", "summary", "thread_cpu_s"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe() -> dict[str, Any]:
    """Cores, CPU model (as ``/proc/cpuinfo`` names it), load average, OS and Python."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 0
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {"cores": os.cpu_count() or 0, "usable_cores": usable, "cpu_model": _cpu_model(),
            "load_average": load, "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version()}


def summary(machine: dict[str, Any]) -> str:
    """One line: ``2 cores (AMD EPYC), load average 0.61 at start``."""
    load = machine.get("load_average") or []
    text = f"{machine['cores']} cores ({machine['cpu_model']})"
    if load:
        text += f", 1-minute load average {load[0]:g} at start"
    return text


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text().split()
            out += [int(c) for c in text]
    except OSError:
        pass
    return out


def _stat_cpu_s(stat: str) -> float:
    """User + system CPU seconds in a ``/proc`` ``stat`` file's text."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def thread_cpu_s(pid: int) -> dict[int, float]:
    """User + system CPU seconds of each live thread of ``pid``, by thread id."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = _stat_cpu_s(Path(f"/proc/{pid}/task/{tid}/stat").read_text())
        except OSError:  # the thread ended meanwhile
            continue
    return out


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` and its live descendants, or None off Linux or
    once the process is gone."""
    total = 0.0
    todo, seen = [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            if p == pid:
                return None
            continue
        total += _stat_cpu_s(stat)
        todo += _children(p)
    return total
