"""``python -m gateway --workers 2``: every scrape reports the server's totals; a dead worker
leaves the live gauges; the metric files live and die with the server."""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from bench.procs import gateway_process
from gateway.workers import metrics_dir
from tests.deploy.support import metric_sum

ROW = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
SENT = 1000


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

        victim = min(counts)  # a worker; the supervisor replaces it
        os.kill(victim, signal.SIGKILL)
        gw.process.wait_for(rf"Worker \[{victim}\] gone")
        assert not list(directory.glob(f"gauge_live*_{victim}.db"))
        assert (directory / f"counter_{victim}.db").exists()
        gw.process.wait_for("Application startup complete", count=3)  # its replacement
        for _ in range(4):
            text = scrape(gw.url)
            assert metric_sum(text, "gateway_requests_total", route="/predict") == SENT
            assert metric_sum(text, "gateway_requests_in_flight") == 1  # this scrape
    assert gw.process.popen.returncode == 0
    assert not list(tmp.glob("gateway-metrics-*")) and not list(tmp.glob(".gateway-metrics-*"))


def test_metrics_dir_is_removed_and_sweeps_only_unlocked_dirs(tmp_path: Path) -> None:
    with metrics_dir(tmp_path) as mine:
        assert mine.is_dir() and re.fullmatch(r"gateway-metrics-\w+", mine.name)
        with metrics_dir(tmp_path) as other:  # a second server: the first one's dir stays
            assert other != mine and mine.is_dir()
        assert not other.exists() and mine.is_dir()
    assert list(tmp_path.iterdir()) == []
