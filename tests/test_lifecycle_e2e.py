"""Model lifecycle against a real uvicorn process: a version registered under load is served
without a restart and without a failed request, SIGHUP reloads the store instead of ending the
process, and the V2 repository API works from the stock ``tritonclient.http``."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from sklearn.dummy import DummyClassifier
from tritonclient.utils import InferenceServerException

from bench.procs import gateway_process
from model_store import ModelStore
from model_store.demo import IRIS_FEATURES

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROWS = np.round(np.random.default_rng(5).uniform([4, 2, 1, 0], [8, 4.5, 7, 2.5], (400, 4)), 2)


def constant(label: str) -> DummyClassifier:
    return DummyClassifier(strategy="constant", constant=label).fit(
        np.zeros((3, 4)), ["setosa", "versicolor", "virginica"])


def probe_until(check: Callable[[], bool], timeout_s: float = 30) -> None:
    """Ask ``check`` (a readiness probe against the server) until it holds; bounded."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.05)  # between probes of the server's own state


def latest(base: str) -> str:
    models = httpx.get(f"{base}/v1/models", timeout=10).json()["models"]
    return str(models[0]["latest"]) if models else "-"


def test_version_registered_under_load_is_served_without_a_failed_request(
        store_root: Path, iris_estimator: Any) -> None:
    answers: list[tuple[int, str, str, int]] = []
    stop = threading.Event()
    with gateway_process({"GATEWAY_MODEL_ROOT": str(store_root),
                          "GATEWAY_MODEL_POLL_S": "0.2"}) as gw:

        def load() -> None:
            with httpx.Client(base_url=gw.base, timeout=10) as client:
                for i in range(20_000):  # bounded; stops once the test has seen enough
                    if stop.is_set():
                        return
                    row = ROWS[i % len(ROWS)].tolist()
                    r = client.post("/v1/models/iris/predict", json={"instances": [row]})
                    body = r.json() if r.status_code == 200 else {}
                    answers.append((r.status_code, body.get("version", ""),
                                    (body.get("predictions") or [""])[0], i % len(ROWS)))

        worker = threading.Thread(target=load)
        worker.start()
        try:
            probe_until(lambda: len(answers) >= 50)
            ModelStore(store_root).register(constant("virginica"), "iris",
                                            features=IRIS_FEATURES, backend="sklearn")
            probe_until(lambda: latest(gw.base) == "2")
            seen = len(answers)
            probe_until(lambda: len(answers) >= seen + 50)
        finally:
            stop.set()
            worker.join(timeout=60)
    assert answers and all(status == 200 for status, *_ in answers)
    expected_v1 = iris_estimator.predict(ROWS).tolist()
    for _, version, label, i in answers:
        assert label == (expected_v1[i] if version == "1" else "virginica")
    assert {v for _, v, _, _ in answers} == {"1", "2"}
    assert answers[-1][1] == "2"  # new requests see the new latest


def test_sighup_reloads_the_store_instead_of_ending_the_process(store_root: Path) -> None:
    with gateway_process({"GATEWAY_MODEL_ROOT": str(store_root),
                          "GATEWAY_MODEL_POLL_S": "0"}) as gw:
        ModelStore(store_root).register(constant("virginica"), "iris", features=IRIS_FEATURES,
                                        backend="sklearn")
        assert latest(gw.base) == "1"  # no polling: not picked up by itself
        gw.proc.send_signal(signal.SIGHUP)
        probe_until(lambda: latest(gw.base) == "2")
        assert gw.proc.poll() is None


def test_repository_api_from_tritonclient(store_root: Path) -> None:
    with gateway_process({"GATEWAY_MODEL_ROOT": str(store_root), "GATEWAY_MODEL_POLL_S": "0",
                          "GATEWAY_ADMIN_TOKEN": "s3cret"}) as gw:
        client = httpclient.InferenceServerClient(gw.base.removeprefix("http://"))
        auth = {"Authorization": "Bearer s3cret"}
        with pytest.raises(InferenceServerException, match="Authorization"):
            client.get_model_repository_index()
        with pytest.raises(InferenceServerException, match="Authorization"):
            client.unload_model("iris", headers={"Authorization": "Bearer wrong"})
        assert client.is_model_ready("iris")
        index = client.get_model_repository_index(headers=auth)
        assert index == [{"name": "iris", "version": "1", "state": "READY"}]
        client.unload_model("iris", headers=auth)
        assert not client.is_model_ready("iris")
        client.load_model("iris", headers=auth)
        assert client.is_model_ready("iris")
        with pytest.raises(InferenceServerException, match="not in the store"):
            client.load_model("nope", headers=auth)
