"""Test support: an instrumented estimator wrapper, an in-process client, event waits.

Real processes (gateways, redis-server) come from ``bench.procs``."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import joblib
import numpy as np
from fastapi import FastAPI

from bench.procs import gateway_process
from gateway import Settings, create_app
from gateway.runtime import Gateway
from model_store import ModelStore

POISON = -999.0  # a row whose first feature is this makes the Probe raise


class Probe:
    """Wraps a fitted estimator: counts calls and rows, can hold calls at a gate, raises on a
    row whose first value is ``POISON``. Thread-safe."""

    def __init__(self, estimator: Any) -> None:
        self.estimator = estimator
        self.n_features_in_ = estimator.n_features_in_
        self.classes_ = getattr(estimator, "classes_", None)
        self.calls = 0
        self.rows = 0
        self.batch_sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set whenever a call starts
        self.permits: threading.Semaphore | None = None  # if set, each call takes one permit
        self._lock = threading.Lock()

    def _enter(self, x: np.ndarray) -> None:
        with self._lock:
            self.calls += 1
            self.rows += len(x)
            self.batch_sizes.append(len(x))
        self.entered.set()
        if self.permits is not None:
            self.permits.acquire(timeout=30)
        else:
            self.gate.wait(timeout=30)
        if np.any(x[:, 0] == POISON):
            raise ValueError("poisoned row")

    def predict(self, x: np.ndarray) -> np.ndarray:
        self._enter(x)
        return self.estimator.predict(x)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        self._enter(x)
        return self.estimator.predict_proba(x)


class ProbeLoader:
    """A ``ModelStore`` loader that wraps each loaded estimator in a ``Probe``."""

    def __init__(self) -> None:
        self.probes: dict[Path, Probe] = {}

    def __call__(self, path: Path) -> Probe:
        probe = Probe(joblib.load(path))
        self.probes[path] = probe
        return probe

    def latest(self) -> Probe:
        """The probe of the last version loaded (versions load in ascending order)."""
        return list(self.probes.values())[-1]


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan and yield an in-process client whose requests see its state."""
    async with serve_with_state(app) as (client, _gateway):
        yield client


@asynccontextmanager
async def serve_with_state(app: FastAPI) -> AsyncIterator[tuple[httpx.AsyncClient, Gateway]]:
    """``serve``, also yielding the lifespan's ``Gateway``."""
    async with app.router.lifespan_context(app) as state:
        assert state is not None

        async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
            await app(dict(scope, state=dict(state)), receive, send)

        transport = httpx.ASGITransport(app=asgi)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            yield client, state["gateway"]


@asynccontextmanager
async def probed_app(
    root: Path, **overrides: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Probe, Gateway]]:
    """An in-process gateway over ``root``; yields the latest version's Probe."""
    loader = ProbeLoader()
    settings = Settings(model_root=root, **overrides)
    app = create_app(settings, store=ModelStore(root, loader=loader))
    async with serve_with_state(app) as (client, gateway):
        yield client, loader.latest(), gateway


async def wait_for(predicate: Callable[[], bool], *, steps: int = 100_000) -> None:
    """Yield to the event loop until ``predicate()`` holds (no timed sleeping)."""
    for _ in range(steps):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def wait_thread_event(event: threading.Event) -> None:
    """Await a ``threading.Event`` set by a worker thread."""
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    threading.Thread(target=lambda: (event.wait(30), loop.call_soon_threadsafe(done.set)),
                     daemon=True).start()
    await done.wait()
    assert event.is_set()


@contextmanager
def uvicorn_process(env: dict[str, str]) -> Iterator[str]:
    """``bench.procs.gateway_process``, yielding only its base URL."""
    with gateway_process(env) as gw:
        yield gw.url
