"""The gateway's load-testing suite: scenarios, side-by-side configurations, reports.

The public names are imported on first use, so that ``python -m bench.loadgen`` (a process
per fixed-rate run) starts without loading the model store and scikit-learn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.runner import Options, Run, run_bench
    from bench.zipf import ZipfSampler

__all__ = ["Options", "Run", "ZipfSampler", "run_bench"]

_WHERE = {"Options": "bench.runner", "Run": "bench.runner", "run_bench": "bench.runner",
          "ZipfSampler": "bench.zipf"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'bench' has no attribute {name!r}")
