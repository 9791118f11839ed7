"""The shipped nginx configs in front of real gateway processes on one real redis-server.

nginx runs ``deploy/nginx/gateway.conf`` (three replicas) or ``deploy/nginx/sidecar.conf`` (one
gateway on a unix socket) with only its listen address and upstream servers replaced.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
import redis
import tritonclient.http as httpclient

from bench.procs import GatewayProcess, free_port, gateway_process, gateways
from bench.replicas import Nginx, nginx_process
from bench.replicas import render_site as render
from model_store.demo import IRIS_FEATURES
from tests.deploy.support import NGINX_DIR, bounded_load, redis_url

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

_HEX32 = re.compile(r"[0-9a-f]{32}")


def q(row: Any) -> dict[str, float]:
    return {n: float(v) for n, v in zip(IRIS_FEATURES, row, strict=True)}


def replica_env(store: Path, redis_proc: Any, prefix: str) -> dict[str, str]:
    """Replicas sharing Redis, on the scikit-learn backend, consulting Redis for every model."""
    return {
        "GATEWAY_MODEL_ROOT": str(store),
        "GATEWAY_REDIS_URL": redis_url(redis_proc),
        "GATEWAY_CACHE_PREFIX": prefix,
        "GATEWAY_BACKEND": "sklearn",
        "GATEWAY_L2_MIN_CALL_US": "0",
    }


def front_of(gws: list[GatewayProcess], directory: Path, conf: str = "gateway.conf") -> Any:
    port = free_port()
    site = render(NGINX_DIR / conf, listen=f"127.0.0.1:{port}", upstreams=[g.upstream for g in gws],
                  metrics_listen=f"127.0.0.1:{free_port()}")
    return nginx_process(site, port, directory)


@dataclass
class Front:
    nginx: Nginx
    gateways: list[GatewayProcess]
    redis: redis.Redis
    prefix: str


@pytest.fixture(scope="module")
def front(nginx: str, session_store: Path, redis_server: Any,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    prefix = "deploy-front"
    env = {**replica_env(session_store, redis_server, prefix), "GATEWAY_ACCESS_LOG": "on"}
    with gateways(3, env) as gws, front_of(gws, tmp_path_factory.mktemp("nginx")) as ngx, \
            redis.Redis(host=redis_server.host, port=redis_server.port) as r:
        yield Front(ngx, gws, r, prefix)


def wait_for_keys(r: redis.Redis, pattern: str, count: int) -> None:
    """Bounded wait until the gateways' background writes have reached Redis."""
    for _ in range(100_000):
        if len(r.keys(pattern)) >= count:
            return
    raise AssertionError(f"fewer than {count} keys {pattern} in redis")


def upstream_of(ngx: Nginx, response: httpx.Response) -> str:
    """The upstream address(es) nginx logged for ``response`` ("-": none was asked)."""
    line = ngx.access_line(response.headers["x-request-id"])
    return re.search(r"upstream=(.+) status=", line).group(1)  # type: ignore[union-attr]


def test_answers_through_nginx_equal_the_models(
    front: Front, iris_rows: np.ndarray, random_rows: np.ndarray, iris_estimator: Any
) -> None:
    rows = np.vstack([iris_rows, random_rows[:400]])
    labels = iris_estimator.predict(rows).tolist()
    with httpx.Client(base_url=front.nginx.url, timeout=30) as client:
        for row, label in zip(rows[::9], labels[::9], strict=True):
            r = client.get("/predict", params=q(row))
            assert r.status_code == 200 and r.json() == {"prediction": label}
        for lo in range(0, len(rows), 200):
            r = client.post("/v1/models/iris/predict",
                            json={"instances": rows[lo:lo + 200].tolist(), "probabilities": True})
            assert r.status_code == 200
            assert r.json()["predictions"] == labels[lo:lo + 200]
            assert np.allclose(r.json()["probabilities"],
                               iris_estimator.predict_proba(rows[lo:lo + 200]))

    triton = httpclient.InferenceServerClient(front.nginx.url.removeprefix("http://"))
    try:
        assert triton.is_server_ready() and triton.is_model_ready("iris")
        for binary in (True, False):
            inp = httpclient.InferInput("input", list(iris_rows.shape), "FP64")
            inp.set_data_from_numpy(iris_rows, binary_data=binary)
            out = [httpclient.InferRequestedOutput(n, binary_data=binary)
                   for n in ("label", "probabilities")]
            result = triton.infer("iris", [inp], outputs=out)
            got = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")]
            assert got == iris_estimator.predict(iris_rows).tolist()
            assert np.allclose(result.as_numpy("probabilities"),
                               iris_estimator.predict_proba(iris_rows))
    finally:
        triton.close()
    served = {re.search(r"upstream=(\S+)", line).group(1)  # type: ignore[union-attr]
              for line in front.nginx.access_lines()}
    assert served >= {g.upstream for g in front.gateways}  # every replica answered some


def test_request_ids_body_limit_and_private_metrics(front: Front, iris_rows: np.ndarray) -> None:
    params = q(iris_rows[0])
    with httpx.Client(base_url=front.nginx.url, timeout=30) as client:
        generated = client.get("/predict", params=params).headers["x-request-id"]
        assert _HEX32.fullmatch(generated)
        passed = client.get("/predict", params=params, headers={"X-Request-Id": "order-42.a:b"})
        assert passed.headers.get_list("x-request-id") == ["order-42.a:b"]  # once
        for bad in ("has space", "x" * 129, "semi;colon"):
            replaced = client.get("/predict", params=params, headers={"X-Request-Id": bad})
            assert _HEX32.fullmatch(replaced.headers["x-request-id"])
        assert front.nginx.access_line(generated) and front.nginx.access_line("order-42.a:b")
        for response in (passed, replaced):  # the gateway that answered logged the same id
            rid = response.headers["x-request-id"]
            (answered,) = [g for g in front.gateways
                           if g.upstream == upstream_of(front.nginx, response)]
            answered.process.wait_for(rf"\[\d+ {re.escape(rid)}\] .*GET /predict 200")

        hidden = client.get("/metrics")
        assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "not_found"
        with front.gateways[0].client() as direct:
            assert direct.get("/metrics").status_code == 200

        # The gateway's own limit (GATEWAY_MAX_BODY_BYTES, 1 MiB) and nginx's are the same: a
        # body of exactly 1 MiB reaches a gateway, one byte more is refused by nginx.
        limit = 1 << 20
        at_limit = client.post("/v1/models/iris/predict", content=b" " * limit)
        assert at_limit.status_code == 400 and at_limit.json()["error"]["code"] == "malformed_json"
        over = client.post("/v1/models/iris/predict", content=b" " * (limit + 1))
        assert over.status_code == 413 and upstream_of(front.nginx, over) == "-"
        assert len(over.headers.get_list("x-request-id")) == 1


def test_a_row_computed_on_one_replica_is_answered_from_redis_by_the_others(
    front: Front, random_rows: np.ndarray, iris_estimator: Any
) -> None:
    row, pair = random_rows[900], random_rows[901:903]
    with httpx.Client(base_url=front.nginx.url, timeout=30) as client:
        first = client.get("/predict", params=q(row))
        assert first.headers["x-cache"] == "miss"
        wait_for_keys(front.redis, f"{front.prefix}:iris:*", 1)
        others = [client.get("/predict", params=q(row)) for _ in range(2)]
        assert [r.headers["x-cache"] for r in others] == ["l2", "l2"]
        assert all(r.json() == first.json() for r in others)
        # three replicas, one computation
        assert len({upstream_of(front.nginx, r) for r in [first, *others]}) == 3

        body = {"instances": pair.tolist()}
        before = len(front.redis.keys(f"{front.prefix}:iris:*"))
        computed = client.post("/v1/models/iris/predict", json=body)
        assert computed.json()["cache"] == ["miss", "miss"]
        wait_for_keys(front.redis, f"{front.prefix}:iris:*", before + 2)
        again = [client.post("/v1/models/iris/predict", json=body) for _ in range(2)]
        assert [a.json()["cache"] for a in again] == [["l2", "l2"], ["l2", "l2"]]
        expected = iris_estimator.predict(pair).tolist()
        assert all(a.json()["predictions"] == expected for a in [computed, *again])
        assert len({upstream_of(front.nginx, r) for r in [computed, *again]}) == 3


@pytest.mark.anyio
async def test_replicas_killed_or_stopped_mid_load_fail_no_request(
    nginx: str, session_store: Path, redis_server: Any, tmp_path: Path,
    random_rows: np.ndarray, iris_estimator: Any,
) -> None:
    env = replica_env(session_store, redis_server, "deploy-faults")
    labels = iris_estimator.predict(random_rows).tolist()

    def get(i: int) -> Any:
        async def call(c: httpx.AsyncClient) -> tuple[int, Any, Any]:
            r = await c.get("/predict", params=q(random_rows[i]))
            return r.status_code, r.json(), {"prediction": labels[i]}
        return call

    def post(i: int) -> Any:
        async def call(c: httpx.AsyncClient) -> tuple[int, Any, Any]:
            rows = random_rows[i:i + 4]
            r = await c.post("/v1/models/iris/predict", json={"instances": rows.tolist()})
            return r.status_code, r.json().get("predictions"), labels[i:i + 4]
        return call

    requests = [post(i % 996) if i % 3 == 0 else get(i % 1000) for i in range(600)]
    with gateways(3, env) as gws, front_of(gws, tmp_path / "nginx") as ngx:
        killed, stopped, _ = gws

        def faults(done: int) -> None:
            if done == 150:
                killed.process.send(signal.SIGKILL)
            elif done == 300:
                stopped.process.send(signal.SIGTERM)

        async with httpx.AsyncClient(base_url=ngx.url, timeout=30) as client:
            with anyio.fail_after(90):
                result = await bounded_load(client, requests, concurrency=12, on_done=faults)
        assert result.completed == 600 and result.problems == []
        assert killed.process.wait(10) == -signal.SIGKILL
        assert stopped.process.wait(20) == 0  # drained and shut down
        assert "Application shutdown complete" in stopped.process.output()
        tried = [re.search(r"upstream=(.+) status=", line).group(1)  # type: ignore[union-attr]
                 for line in ngx.access_lines(at_least=600)]
        assert any(u.startswith(killed.upstream + ", ") for u in tried)  # retried elsewhere


def test_sidecar_over_a_unix_socket(
    nginx: str, session_store: Path, tmp_path: Path, iris_rows: np.ndarray, iris_estimator: Any
) -> None:
    sock = tmp_path / "gateway.sock"
    env = {"GATEWAY_MODEL_ROOT": str(session_store)}
    metrics_port = free_port()
    with gateway_process(env, uds=sock, args=["--forwarded-allow-ips", "*"]) as gw:
        assert sock.is_socket() and sock.stat().st_mode & 0o777 == 0o666
        port = free_port()
        site = render(NGINX_DIR / "sidecar.conf", listen=f"127.0.0.1:{port}",
                      upstreams=[gw.upstream], metrics_listen=f"127.0.0.1:{metrics_port}")
        with nginx_process(site, port, tmp_path / "nginx") as ngx, \
                httpx.Client(base_url=ngx.url, timeout=30) as client:
            labels = iris_estimator.predict(iris_rows).tolist()
            for row, label in zip(iris_rows[::10], labels[::10], strict=True):
                assert client.get("/predict", params=q(row)).json() == {"prediction": label}
            r = client.post("/v1/models/iris/predict", json={"instances": iris_rows.tolist()})
            assert r.json()["predictions"] == labels
            ready = client.get("/readyz")
            assert ready.json()["status"] == "ready"
            assert upstream_of(ngx, ready) == f"unix:{sock}"
            assert client.get("/metrics").status_code == 404
            scrape = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
            assert scrape.status_code == 200 and "gateway_requests_total" in scrape.text
    assert not sock.exists()
