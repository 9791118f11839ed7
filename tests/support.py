"""Test support: an instrumented estimator wrapper, an in-process client, event waits.

The in-process client speaks HTTP/1.1 to the gateway's own uvicorn protocol
(``GatewayHttpProtocol``) over an in-memory transport: requests take the path a served request
takes, the fast lane included. Real processes (gateways, redis-server) come from
``bench.procs``."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import h11
import httpx
import joblib
import numpy as np
from fastapi import FastAPI

from bench.procs import gateway_process
from gateway import Settings, create_app
from gateway.core.pipeline import Answer, Pending
from gateway.runtime import Gateway
from gateway.server import GatewayConfig, GatewayHttpProtocol, GatewayServerState
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
        transport = ProtocolTransport(app, dict(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            yield client, state["gateway"]


class _Wire(asyncio.Transport):
    """The server side of an in-memory connection: what the protocol writes is kept."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = bytearray()
        self.wrote = asyncio.Event()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += data
        self.wrote.set()

    def close(self) -> None:
        self.closed = True
        self.wrote.set()

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default)


class _Traced(GatewayHttpProtocol):
    """The gateway's protocol, keeping the ASGI tasks it starts (to await their end)."""

    def start_task(self, cycle: Any, app: Any) -> None:
        before = set(self.tasks)
        super().start_task(cycle, app)
        self.started: set[asyncio.Task[None]] = getattr(self, "started", set())
        self.started |= self.tasks - before


class ProtocolTransport(httpx.AsyncBaseTransport):
    """httpx requests served by the gateway's uvicorn protocol in this event loop, one
    connection per request, over ``_Wire``; ``app_state`` is the lifespan's state."""

    def __init__(self, app: Any, app_state: dict[str, Any]) -> None:
        self._config = GatewayConfig(app, http=_Traced, ws="none",
                                     access_log=False, lifespan="off")
        self._config.load()
        self._state = GatewayServerState()
        self._app_state = app_state

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        chunked = request.headers.get("transfer-encoding", "").lower() == "chunked"
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method=request.method, target=b"/", headers=[(b"host", b"gw")]))
        # The request as written, even where it breaks HTTP (h11 would refuse to send it).
        head = b"".join([request.method.encode(), b" ", request.url.raw_path, b" HTTP/1.1\r\n",
                         *(k + b": " + v + b"\r\n" for k, v in request.headers.raw), b"\r\n"])
        wire = _Wire()
        protocol = _Traced(self._config, self._state, self._app_state)
        protocol.connection_made(wire)
        try:
            protocol.data_received(head)
            async for chunk in request.stream:  # type: ignore[union-attr]
                if wire.sent or wire.closed:
                    break  # answered before the whole body was sent: stop, as a client does
                if chunk:
                    protocol.data_received(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked
                                           else chunk)
                    await asyncio.sleep(0)  # the app reads what has arrived
            else:
                if chunked:
                    protocol.data_received(b"0\r\n\r\n")
            response: h11.Response | None = None
            chunks: list[bytes] = []
            async with asyncio.timeout(60):
                while True:
                    event = client.next_event()
                    if event is h11.NEED_DATA:
                        if wire.sent:
                            client.receive_data(bytes(wire.sent))
                            wire.sent.clear()
                        elif wire.closed:
                            client.receive_data(b"")
                        else:
                            wire.wrote.clear()
                            await wire.wrote.wait()
                    elif isinstance(event, h11.Response):
                        response = event
                    elif isinstance(event, h11.Data):
                        chunks.append(bytes(event.data))
                    elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                        break
                started: set[asyncio.Task[None]] = getattr(protocol, "started", set())
                if started:  # let the app finish after its last send (closing its files)
                    await asyncio.wait(started)
        finally:
            protocol.connection_lost(None)
        assert response is not None, "the connection closed before a response"
        return httpx.Response(response.status_code, headers=list(response.headers),
                              content=b"".join(chunks), request=request)


async def ask(gw: Gateway, rows: np.ndarray, *, model: str = "iris",
              outputs: frozenset[Any] = frozenset({"label"}), timeout_s: float = 30.0) -> Answer:
    """The gateway's answer for ``rows`` (2-D) of ``model``, as a door gets it: ``begin``,
    then ``finish`` if it has to wait. Cancelling it is a caller that leaves."""
    (begun,) = gw.begin([(gw.runtime(model), rows, outputs)])
    if isinstance(begun, Exception):
        raise begun
    if type(begun) is Answer:
        return begun
    assert type(begun) is Pending
    return await gw.finish(begun, timeout_s)


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


class LoopSteps:
    """Counts the event loop's steps while started: a callback that schedules itself again
    runs once a step, so ``now`` after some code minus ``now`` before is how many steps it
    waited through."""

    def __init__(self) -> None:
        self.now = 0
        self._handle: asyncio.Handle | None = None

    def start(self) -> LoopSteps:
        self._handle = asyncio.get_running_loop().call_soon(self._tick)
        return self

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        self.now += 1
        self._handle = asyncio.get_running_loop().call_soon(self._tick)


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
