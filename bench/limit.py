"""The model's own limit: how many rows a second the served backend computes in-process.

The gateway can never answer more rows a second than its model computes; this measures that
ceiling the way the gateway calls the model, without HTTP, cache or batcher: the version loaded
as the gateway loads it (``ModelStore.load_sync``: the manifest's chosen backend for each
output, the version's ``threads`` setting), called on 64-row blocks (the gateway's default
``max_batch_size``) for what a V2 or ``/v1`` answer carries (labels and probabilities:
``predict_both``, one model call where the manifest allows it; a regressor's ``predict``).
The rows are the bench's own unique rows (``bench.doors.unique_rows``), so the model walks the
trees the load makes it walk.

Each of ``repeats`` rounds times ``calls`` calls and keeps their median; the figure is the
median of the rounds, with their minimum and maximum. ``python -m bench.limit`` prints it.

The limit is measured with the machine's other cores idle; a serving process keeps one of them
busy with its event loop. ``--beside-busy`` measures the same calls again while plain Python
keeps every other core busy (``busy_cores``) and prints how much longer a call takes then:
whether the limit measured alone holds beside a busy core on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.doors import MAX_SALT, unique_rows
from bench.procs import Process
from model_store import LoadedModel, ModelStore

__all__ = ["Limit", "busy_cores", "describe_backend", "measure", "measure_loaded"]

_SALT = MAX_SALT - 1  # rows no bench run sends (runs' salts count up from 1)


@dataclass(frozen=True, slots=True)
class Limit:
    """The model's own limit for one version, as measured (times in microseconds)."""

    model: str
    version: int
    backend: str  # what answers, per output: "label=lightgbm Booster.predict, ..."
    threads: int | None  # threads inside one call (XGBoost, LightGBM); None: not a setting
    rows: int  # rows per call
    call_us: float  # median over the rounds of each round's median call
    call_us_min: float
    call_us_max: float
    row1_us: float  # median time of a one-row call (what a lone request costs the model)
    calls: int
    repeats: int

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.call_us * 1e6

    @property
    def rows_per_s_min(self) -> float:
        return self.rows / self.call_us_max * 1e6

    @property
    def rows_per_s_max(self) -> float:
        return self.rows / self.call_us_min * 1e6

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "rows_per_s": self.rows_per_s,
                "rows_per_s_min": self.rows_per_s_min, "rows_per_s_max": self.rows_per_s_max}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Limit:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})

    def sentence(self) -> str:
        """One line for a report."""
        threads = f", {self.threads} thread(s)" if self.threads is not None else ""
        return (f"{self.model} v{self.version} ({self.backend}{threads}): "
                f"{self.rows_per_s:,.0f} rows/s ({self.rows_per_s_min:,.0f}.."
                f"{self.rows_per_s_max:,.0f}) on {self.rows}-row calls of "
                f"{self.call_us / 1000:.2f} ms ({self.call_us_min / 1000:.2f}.."
                f"{self.call_us_max / 1000:.2f}); one row {self.row1_us / 1000:.2f} ms")


def describe_backend(model: LoadedModel) -> str:
    """Which backend answers each output, as the store chose it (``via``: the library call a
    booster family's fast path makes in this process, and the one a lone row goes through
    where it differs)."""
    parts = []
    for output, backend in model.backends().items():
        fast = model.booster if backend == model.manifest.family else None
        via = "" if fast is None else f" {fast.via}" + (
            f" (a lone row: {fast.one_row})" if fast.one_row else "")
        parts.append(f"{output}={backend}{via}")
    return ", ".join(parts)


def _call(model: LoadedModel) -> Any:
    if model.has_proba:
        return model.predict_both
    return model.predict


def _median_call_us(fn: Any, blocks: list[np.ndarray], calls: int) -> float:
    samples = []
    for i in range(calls):
        x = blocks[i % len(blocks)]
        start = time.perf_counter()
        fn(x)
        samples.append(time.perf_counter() - start)
    return float(statistics.median(samples)) * 1e6


def measure_loaded(model: LoadedModel, *, rows: int = 64, calls: int = 50,
                   repeats: int = 5) -> Limit:
    """Time ``model`` (loaded) on ``rows``-row calls: ``repeats`` rounds of ``calls``."""
    if rows < 1 or calls < 1 or repeats < 1:
        raise ValueError("rows, calls and repeats must be >= 1")
    n_features = len(model.manifest.features)
    data = unique_rows(_SALT, 0, rows * 16, n_features)
    blocks = [data[i * rows:(i + 1) * rows] for i in range(16)]
    fn = _call(model)
    for x in blocks[:4]:  # first calls pay for lazy set-up
        fn(x)
    rounds = [_median_call_us(fn, blocks, calls) for _ in range(repeats)]
    one = _median_call_us(fn, [data[i:i + 1] for i in range(16)], calls)
    settings = model.manifest.settings
    threads = (settings.threads or 1) if model.manifest.family in ("xgboost", "lightgbm") \
        else None
    return Limit(model=model.name, version=model.version, backend=describe_backend(model),
                 threads=threads, rows=rows, call_us=float(statistics.median(rounds)),
                 call_us_min=min(rounds), call_us_max=max(rounds), row1_us=one, calls=calls,
                 repeats=repeats)


def measure(root: Path, name: str, version: int | None = None, **kw: Any) -> Limit:
    """The limit of ``name`` (latest version unless given) in the store at ``root``."""
    return measure_loaded(_load(root, name, version), **kw)


def _load(root: Path, name: str, version: int | None) -> LoadedModel:
    store = ModelStore(root)
    return store.load_sync(name, version or store.latest(name))


_BUSY = """import sys, time
end = time.monotonic() + float(sys.argv[1])
print("busy", flush=True)
while time.monotonic() < end:
    pass
"""


@contextlib.contextmanager
def busy_cores(count: int, *, seconds: float = 600.0) -> Iterator[list[int]]:
    """``count`` processes of plain Python each keeping a core busy for the block, their PIDs
    yielded once every one of them runs; killed when the block ends (each also ends by itself
    after ``seconds``). Raises RuntimeError when one does not start."""
    with contextlib.ExitStack() as stack:
        procs = []
        for _ in range(count):
            proc = Process([sys.executable, "-c", _BUSY, str(seconds)], stdout=subprocess.STDOUT)
            stack.callback(proc.stop, signal.SIGKILL)
            procs.append(proc)
        for proc in procs:
            proc.wait_for("^busy$", timeout_s=60)
        yield [proc.pid for proc in procs]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.limit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-root", type=Path, default=Path("models"))
    p.add_argument("--model", default="iris")
    p.add_argument("--version", type=int, default=None, help="default: latest")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--beside-busy", action="store_true",
                   help="measure again with every other core busy in plain Python")
    args = p.parse_args(argv)
    model = _load(args.model_root, args.model, args.version)
    kw = {"rows": args.rows, "calls": args.calls, "repeats": args.repeats}
    alone = measure_loaded(model, **kw)
    print(alone.sentence())
    if args.beside_busy:
        others = max(1, (os.cpu_count() or 2) - 1)
        with busy_cores(others):
            beside = measure_loaded(model, **kw)
        print(f"beside {others} core(s) busy in plain Python: {beside.sentence()}; a call "
              f"{beside.call_us / alone.call_us:.2f}x as long")
    return 0


if __name__ == "__main__":
    sys.exit(main())
