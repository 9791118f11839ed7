"""The gateway's load-testing suite: scenarios, side-by-side configurations, reports."""

from bench.runner import Options, Run, run_bench
from bench.zipf import ZipfSampler

__all__ = ["Options", "Run", "ZipfSampler", "run_bench"]
