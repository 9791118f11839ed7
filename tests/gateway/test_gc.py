"""The collector's work does not grow with the cache: what requests leave behind (L1 entries,
finished flights, batches) is not traversed by a full collection.

A ``gc.callbacks`` probe records every collection while the cache fills; the figures are
printed (``-s``) for the bench notes, and the test asserts what makes the pauses short: the
objects a generation-2 collection must traverse stay a small fraction of the entries cached.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support import probed_app

pytestmark = pytest.mark.anyio


@contextmanager
def quiet_client() -> Iterator[None]:
    """The test client's per-request log records, which pytest's log capture keeps for the
    report when the level is INFO, are not objects the gateway leaves behind."""
    client_log = logging.getLogger("httpx")
    level = client_log.level
    client_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        client_log.setLevel(level)


@contextmanager
def gc_probe() -> Iterator[list[tuple[int, float]]]:
    """Yields a list that receives ``(generation, seconds)`` for each collection."""
    pauses: list[tuple[int, float]] = []
    started: dict[str, float] = {}

    def probe(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started["t"] = time.perf_counter()
        else:
            pauses.append((info["generation"], time.perf_counter() - started["t"]))

    gc.callbacks.append(probe)
    try:
        yield pauses
    finally:
        gc.callbacks.remove(probe)


async def test_cached_entries_are_not_traversed_by_the_collector(session_store: Path) -> None:
    rng = np.random.default_rng(11)
    rows = np.round(rng.uniform([4, 2, 1, 0], [8, 4.5, 7, 2.5], size=(8192, 4)), 3)
    warm = np.round(rng.uniform([4, 2, 1, 0], [8, 4.5, 7, 2.5], size=(64, 4)), 3) + 10
    async with probed_app(session_store, l1_max_entries=100_000) as (client, _probe, gw):
        assert gw.l1 is not None
        # what the first request of a process builds once (schemas, lazy imports) is not growth
        r = await client.post("/v1/models/iris/predict", json={
            "instances": warm.tolist(), "probabilities": True})
        assert r.status_code == 200
        gc.collect()
        tracked_before = len(gc.get_objects())
        with quiet_client(), gc_probe() as pauses:
            for start in range(0, len(rows), 64):
                r = await client.post("/v1/models/iris/predict", json={
                    "instances": rows[start:start + 64].tolist(), "probabilities": True})
                assert r.status_code == 200
            gc.collect()
        tracked_after = len(gc.get_objects())
        cached = len(gw.l1) - len(warm)
    assert cached == len(rows)  # labels and probabilities of a row live in one entry
    full = [s for g, s in pauses if g == 2]
    print(f"\n{cached} cached entries; objects tracked by the collector: +"
          f"{tracked_after - tracked_before}; generation-2 collections: {len(full)}, "
          f"longest {max(full) * 1e3:.2f} ms")
    assert tracked_after - tracked_before < cached // 10
