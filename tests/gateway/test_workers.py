"""``python -m gateway --workers 2`` and its supervisor (``gateway.supervisor``), against real
processes: every scrape reports the server's totals; a dead or stuck worker is replaced and
requests keep being answered; SIGTERM answers what is in flight and exits 0; SIGHUP reloads the
store in every worker without restarting one; a startup failure stops the server without a
respawn loop; workers whose supervisor is gone shut down. The metric files live and die with
the server. Each step waits on the processes' own log lines or answers, never on a clock."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
import uvicorn
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from sklearn.dummy import DummyClassifier
from starlette.applications import Starlette

from bench.procs import GatewayProcess, Process, free_port, gateway_process
from gateway.supervisor import _drain, _signal_wakeup
from gateway.workers import metrics_dir
from model_store import ModelStore
from model_store.demo import IRIS_FEATURES
from tests.contracts.fence import Fence, check, pin, report
from tests.deploy.support import metric_sum
from tests.gateway.remote_support import NOTIFY_ENV, SLEEP_ENV, Sleepy

ROW = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
SENT = 1000
_STARTED = "Application startup complete"


async def send(url: str, n: int, concurrency: int) -> list[int]:
    """``n`` GET /predict, each on a new connection (so both workers accept some)."""
    statuses: list[int] = []
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        async def worker(k: int) -> None:
            for _ in range(k):
                statuses.append((await client.get("/predict", params=ROW)).status_code)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(concurrency):
                    tg.start_soon(worker, n // concurrency + (i < n % concurrency))
    return statuses


def scrape(url: str) -> str:
    r = httpx.get(f"{url}/metrics", headers={"Connection": "close"}, timeout=10)
    assert r.status_code == 200
    return r.text


def per_worker(directory: Path, tmp: Path) -> dict[int, float]:
    """``/predict`` requests counted in each worker's own counter file."""
    out = {}
    for f in directory.glob("counter_*.db"):
        pid = int(f.stem.split("_")[1])
        alone = tmp / str(pid)
        alone.mkdir()
        shutil.copy(f, alone)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(alone))  # type: ignore[no-untyped-call]
        out[pid] = metric_sum(generate_latest(registry).decode(), "gateway_requests_total",
                              route="/predict")
    return out


def worker_pids(gw: GatewayProcess) -> list[int]:
    """The workers started so far, in order (uvicorn's line as each server starts)."""
    return [int(m.group(1)) for m in gw.process.matches(r"Started server process \[(\d+)\]")]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.anyio
async def test_two_workers_report_the_servers_totals(session_store: Path, tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    stale = tmp / "gateway-metrics-stale"  # left by a server that was killed
    stale.mkdir(parents=True)
    (stale / "counter_1.db").write_bytes(b"\0" * 8)
    env = {"GATEWAY_MODEL_ROOT": str(session_store), "TMPDIR": str(tmp)}
    with gateway_process(env, workers=2) as gw:
        assert not stale.exists()
        (directory,) = tmp.glob("gateway-metrics-*")
        statuses = await send(gw.url, SENT, concurrency=8)
        assert statuses == [200] * SENT
        for _ in range(6):  # each on a new connection, answered by either worker
            assert metric_sum(scrape(gw.url), "gateway_requests_total", route="/predict") == SENT
        counts = per_worker(directory, tmp_path)
        assert len(counts) == 2 and all(counts.values()) and sum(counts.values()) == SENT

        victim = min(counts)  # a worker, killed by its PID; the supervisor replaces it
        os.kill(victim, signal.SIGKILL)
        gw.process.wait_for(rf"Worker \[{victim}\] gone")
        assert not list(directory.glob(f"gauge_live*_{victim}.db"))
        assert (directory / f"counter_{victim}.db").exists()
        gw.process.wait_for(_STARTED, count=3)  # its replacement
        for _ in range(4):  # the dead worker's requests still count
            text = scrape(gw.url)
            assert metric_sum(text, "gateway_requests_total", route="/predict") == SENT
            assert metric_sum(text, "gateway_requests_in_flight") == 1  # this scrape
        assert await send(gw.url, SENT, concurrency=8) == [200] * SENT  # and the server serves
        assert metric_sum(scrape(gw.url), "gateway_requests_total", route="/predict") == 2 * SENT
        assert len(worker_pids(gw)) == 3
    assert gw.process.popen.returncode == 0
    assert not list(tmp.glob("gateway-metrics-*")) and not list(tmp.glob(".gateway-metrics-*"))


@pytest.fixture
def sleepy_store(tmp_path: Path, iris_estimator: Any) -> Path:
    root = tmp_path / "models"
    ModelStore(root).register(Sleepy(iris_estimator), "iris", features=IRIS_FEATURES,
                              backend="sklearn")
    return root


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.anyio
async def test_sigterm_answers_requests_in_flight_and_exits_0(sleepy_store: Path,
                                                               tmp_path: Path) -> None:
    """Every model call (one per request: batches of one) takes 1 s and first reports itself;
    once the last of four has started, SIGTERM reaches the supervisor: the requests still in
    flight are answered 200 within the grace period, and the server exits 0."""
    calls: asyncio.Queue[int] = asyncio.Queue()

    async def on_call(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        calls.put_nowait(int(await reader.readline()))
        writer.close()

    notify = tmp_path / "calls.sock"
    env = {"GATEWAY_MODEL_ROOT": str(sleepy_store), "GATEWAY_EXECUTION": "thread",
           "GATEWAY_MAX_BATCH_SIZE": "1", "GATEWAY_SHUTDOWN_GRACE_S": "10",
           SLEEP_ENV: "1", NOTIFY_ENV: str(notify)}
    rows = np.random.default_rng(3).uniform(0, 8, size=(4, 4)).round(3).tolist()
    server = await asyncio.start_unix_server(on_call, path=str(notify))
    async with server:
        with gateway_process(env, workers=2) as gw:
            clients = [httpx.AsyncClient(base_url=gw.url, timeout=60) for _ in rows]
            try:
                posts = [asyncio.ensure_future(c.post("/v1/models/iris/predict",
                                                      json={"instances": [row]}))
                         for c, row in zip(clients, rows, strict=True)]
                with anyio.fail_after(60):
                    callers = {await calls.get() for _ in rows}
                gw.process.send(signal.SIGTERM)
                in_flight = [p for p in posts if not p.done()]
                answers = await asyncio.gather(*posts)
            finally:
                for c in clients:
                    await c.aclose()
            assert in_flight and callers <= set(worker_pids(gw))
            assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
            assert gw.process.wait(timeout_s=60) == 0, gw.process.output()
    log = gw.process.output()
    assert "Received SIGTERM: stopping the workers" in log
    assert log.count("Finished server process") == 2 and "starting another" not in log


@pytest.mark.e2e
@pytest.mark.slow
def test_sighup_reloads_every_worker_without_restarting_them(store_root: Path) -> None:
    env = {"GATEWAY_MODEL_ROOT": str(store_root), "GATEWAY_MODEL_POLL_S": "0"}
    with gateway_process(env, workers=2) as gw:
        before = worker_pids(gw)
        ModelStore(store_root).register(
            DummyClassifier(strategy="constant", constant="virginica").fit(
                np.zeros((3, 4)), ["setosa", "versicolor", "virginica"]),
            "iris", features=IRIS_FEATURES, backend="sklearn")
        gw.process.send(signal.SIGHUP)
        loaded = gw.process.wait_for(r"\[(\d+) [^]]*\] loaded model iris v2", count=2)
        assert {int(m.group(1)) for m in loaded} == set(before)
        for _ in range(6):  # each on a new connection, answered by either worker
            r = httpx.get(f"{gw.url}/predict", params=ROW, headers={"Connection": "close"})
            assert r.json() == {"prediction": "virginica"}
        assert worker_pids(gw) == before and gw.proc.poll() is None
    assert gw.process.popen.returncode == 0


@pytest.mark.e2e
@pytest.mark.slow
def test_a_stuck_worker_is_killed_and_replaced(session_store: Path) -> None:
    """A worker whose event loop sends no heartbeat (here: a stopped process) for the
    health-check timeout is killed and replaced; the other keeps answering meanwhile."""
    env = {"GATEWAY_MODEL_ROOT": str(session_store)}
    with gateway_process(env, workers=2, args=["--timeout-worker-healthcheck", "1"]) as gw:
        stuck, other = worker_pids(gw)
        gw.process.wait_for(rf"Worker \[{stuck}\] is serving")  # its heartbeat is checked
        os.kill(stuck, signal.SIGSTOP)
        gw.process.wait_for(rf"Worker \[{stuck}\] sent no heartbeat for [\d.]+ s")
        gw.process.wait_for(rf"Worker \[{stuck}\] ended with signal SIGKILL: starting another")
        gw.process.wait_for(_STARTED, count=3)
        assert worker_pids(gw)[:2] == [stuck, other]
        assert len(worker_pids(gw)) == 3
        for _ in range(6):
            r = httpx.get(f"{gw.url}/predict", params=ROW, headers={"Connection": "close"})
            assert r.status_code == 200
    assert gw.process.popen.returncode == 0


@pytest.mark.e2e
@pytest.mark.slow
def test_workers_shut_down_when_their_supervisor_is_gone(session_store: Path) -> None:
    with gateway_process({"GATEWAY_MODEL_ROOT": str(session_store)}, workers=2,
                         args=["--timeout-worker-healthcheck", "1"]) as gw:
        workers = worker_pids(gw)
        gw.process.send(signal.SIGKILL)
        try:
            gw.process.wait_for("The supervisor is gone: shutting down", count=2)
            finished = gw.process.wait_for(r"Finished server process \[(\d+)\]", count=2)
            assert sorted(int(m.group(1)) for m in finished) == sorted(workers)
        finally:  # the test started them: none is left behind, whatever happened
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def failing_app() -> Starlette:
    """An app factory whose startup fails (for the worker processes of the test below)."""
    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        raise RuntimeError("no model store here")
        yield

    return Starlette(lifespan=lifespan)


_SUPERVISE = """
import sys
from gateway.server import gateway_config
from gateway.settings import Settings
from gateway.supervisor import supervise
config = gateway_config(Settings(), "tests.gateway.test_workers:failing_app", workers=2,
                        port=int(sys.argv[1]), log_level="info")
sys.exit(supervise(config, config.bind_socket()))
"""


@pytest.mark.e2e
@pytest.mark.slow
def test_a_startup_failure_stops_the_server_without_respawning(session_store: Path) -> None:
    proc = Process([sys.executable, "-c", _SUPERVISE, str(free_port())],
                   env={**os.environ, "GATEWAY_MODEL_ROOT": str(session_store)},
                   stdout=subprocess.STDOUT)
    status = proc.wait(timeout_s=120)
    log = proc.output()
    assert status == uvicorn.config.STARTUP_FAILURE, log
    assert re.search(r"Worker \[\d+\] failed to start: stopping the server", log), log
    assert log.count("Started server process") <= 2, log  # the two first workers, no more
    assert "starting another" not in log


# -- fast ---------------------------------------------------------------------------------------

SUPERVISOR_HOOKS = Fence("uvicorn", "0.55.0", "tests/gateway/test_workers.py", (
    # What gateway/supervisor.py and gateway/workers.py call of uvicorn: public methods only.
    pin("uvicorn.config", "Config.bind_socket", None, "workers:serve_workers",
        signature="self"),
    pin("uvicorn.config", "Config.configure_logging", None, "supervisor:_work",
        signature="self"),
    pin("uvicorn.server", "Server.serve", None, "supervisor:_serve", signature="self, sockets"),
))  # and STARTUP_FAILURE, pinned in tests/contracts/test_uvicorn.py


def test_the_public_hooks_of_uvicorn_the_supervisor_uses_hold() -> None:
    problems = check(SUPERVISOR_HOOKS)
    assert not problems, report(problems)
    config = uvicorn.Config(failing_app, factory=True, log_config=None)
    server = uvicorn.Server(config)
    assert not server.started and not server.should_exit  # read and set by _heartbeat
    assert config.timeout_worker_healthcheck == 5 and config.loop == "auto"
    assert uvicorn.config.STARTUP_FAILURE == 3


def test_signals_reach_the_supervisors_loop_as_bytes_and_handlers_are_restored() -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    with _signal_wakeup() as wakeup:
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGTERM)  # the process goes on: the supervisor decides
        assert wait([wakeup], timeout=10) == [wakeup]
        assert _drain(wakeup) == [signal.SIGHUP, signal.SIGTERM]
        assert _drain(wakeup) == []
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)) == before


def test_metrics_dir_is_removed_and_sweeps_only_unlocked_dirs(tmp_path: Path) -> None:
    with metrics_dir(tmp_path) as mine:
        assert mine.is_dir() and re.fullmatch(r"gateway-metrics-\w+", mine.name)
        with metrics_dir(tmp_path) as other:  # a second server: the first one's dir stays
            assert other != mine and mine.is_dir()
        assert not other.exists() and mine.is_dir()
    assert list(tmp_path.iterdir()) == []
