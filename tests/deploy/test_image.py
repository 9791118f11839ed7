"""The image, built and run for real with podman; and compose.yaml brought up with podman-compose.

``scripts/image.sh`` builds it the way an air-gapped user does: a Debian 12 base made with
debootstrap (once: reused while ``podman image exists`` finds it), the locked packages from a
wheelhouse of ``requirements/runtime.lock``, no image registry and no package index inside the
build. A container of it then serves a model store trained on the host, as its non-root user;
its answers equal the estimator's; SIGTERM with requests in flight answers every one of them
and exits 0. Then ``compose.yaml`` as shipped, with podman-compose: Redis, the demo model into
a volume, three gateway replicas and nginx in front. No registry serves ``redis`` or
``nginx-unprivileged`` here, so an override names stand-ins built on the same Debian base
(Debian's redis-server and nginx, run the way the official images run them).

Containers run with ``--runtime runc`` and explicit rlimits, as the script builds: crun refuses
hosts with hybrid cgroups, and podman's default rlimits exceed what some hosts allow.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sklearn.ensemble import RandomForestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bench.procs import free_port
from model_store import ModelStore
from model_store.demo import IRIS_FEATURES, iris_data, train_iris
from tests.deploy.support import ROOT, metric_sum

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

IMAGE = "localhost/inference-gateway:test"
BASE_IMAGE = "localhost/gateway-base:bookworm"
PODMAN = ("podman", "--runtime", "runc")
ULIMITS = ("--ulimit", "nofile=16384:16384", "--ulimit", "nproc=4096:4096")
UID = "10001"  # the Dockerfile's USER
SCRIPT = ROOT / "scripts" / "image.sh"


def podman(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: exit {done.returncode}: {done.stderr}")
    return done


def _script(*args: str) -> None:
    env = {**os.environ, "IMAGE": IMAGE, "BASE_IMAGE": BASE_IMAGE, "PYTHON": sys.executable}
    start = time.monotonic()
    done = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=840)
    print(f"scripts/image.sh {' '.join(args)}: {time.monotonic() - start:.0f} s")
    if done.returncode == 3:  # the script's word for it: no container runs here
        pytest.skip(done.stderr.strip().splitlines()[-1])
    if done.returncode != 0:
        pytest.fail(f"scripts/image.sh {' '.join(args)} exited {done.returncode}:\n"
                    f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}", pytrace=False)


@pytest.fixture(scope="module")
def image() -> str:
    """The image, built by scripts/image.sh; skipped only where podman cannot run a container
    at all (not installed and not installable here, or the kernel refuses the runtime)."""
    if shutil.which("podman") is None and os.geteuid() != 0:
        pytest.skip("podman is not installed, and only root can install it (apt-get)")
    _script("--base-only")  # podman, runc, debootstrap; the base (made: a container ran)
    probe = podman("run", "--rm", *ULIMITS, BASE_IMAGE, "true", check=False)  # or kept
    if probe.returncode != 0:
        pytest.skip(f"podman cannot run a container on this machine: {probe.stderr.strip()}")
    _script()
    return IMAGE


@dataclass
class Models:
    root: Path
    slow: Any  # the "slow" model's estimator


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    """A store trained on the host: the demo (``python -m model_store train-demo``: iris), and
    ``slow``, a scaler and forest on the scikit-learn backend with batches of one row (about
    3 ms a row) to keep requests in flight. Readable by the image's user, uid 10001."""
    root = tmp_path_factory.mktemp("image") / "models"
    subprocess.run([sys.executable, "-m", "model_store", "--root", str(root), "train-demo"],
                   check=True, capture_output=True, timeout=300)
    x, y = iris_data()
    slow = make_pipeline(StandardScaler(), RandomForestClassifier(random_state=0)).fit(x, y)
    ModelStore(root).register(slow, "slow", features=IRIS_FEATURES, backend="sklearn",
                              settings={"max_batch_size": 1})
    for path in [root, *root.rglob("*")]:  # whatever the umask: others may read (a+rX)
        path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))
    return Models(root, slow)


@dataclass
class Container:
    name: str
    url: str
    grpc: str | None = None  # host:port of its gRPC service, when turned on

    def state(self, field: str) -> str:
        return podman("inspect", "--format", f"{{{{.State.{field}}}}}", self.name).stdout.strip()

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return done.stdout + done.stderr

    def wait_ready(self, attempts: int = 300) -> None:
        """Poll ``/readyz`` until 200 (at most ``attempts`` times, 0.1 s apart); fail at once,
        with the logs, if the container stops."""
        with httpx.Client(base_url=self.url, timeout=2) as client:
            for _ in range(attempts):
                try:
                    if client.get("/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if self.state("Status") != "running":
                    raise AssertionError(f"{self.name} stopped: {self.logs()}")
                time.sleep(0.1)
        raise AssertionError(f"{self.name} not ready after {attempts} polls: {self.logs()}")


@contextmanager
def container(image: str, models: Path, env: Mapping[str, str] = {}) -> Iterator[Container]:
    """A container of ``image`` serving ``models`` (read-only at /models) on a host port of
    podman's choice; removed on exit."""
    name = f"gateway-test-{os.getpid()}-{secrets.token_hex(3)}"
    argv = ["run", "--detach", "--name", name, *ULIMITS, "--volume", f"{models}:/models:ro",
            "--publish", "127.0.0.1::8000"]
    grpc_on = env.get("GATEWAY_GRPC_PORT") == "8001"
    if grpc_on:
        argv += ["--publish", "127.0.0.1::8001"]
    for key, value in env.items():
        argv += ["--env", f"{key}={value}"]
    try:
        podman(*argv, image)
        host, _, port = podman("port", name, "8000/tcp").stdout.strip().rpartition(":")
        grpc_address = podman("port", name, "8001/tcp").stdout.strip() if grpc_on else None
        yield Container(name, f"http://{host}:{port}", grpc_address)
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


def test_the_image_serves_the_models_as_its_non_root_user(image: str, models: Models) -> None:
    grpc_on = {"GATEWAY_GRPC_PORT": "8001", "GATEWAY_GRPC_HOST": "0.0.0.0"}  # as compose.yaml
    with container(image, models.root, grpc_on) as c:
        start = time.monotonic()
        c.wait_ready()
        print(f"ready {time.monotonic() - start:.1f} s after podman run")
        rows, _ = iris_data()
        expected = train_iris().predict(rows).tolist()
        with httpx.Client(base_url=c.url, timeout=30) as client:
            r = client.post("/v1/models/iris/predict", json={"instances": rows.tolist()})
            assert r.status_code == 200, r.text
            assert r.json()["predictions"] == expected
            row = dict(zip(IRIS_FEATURES, rows[100].tolist(), strict=True))
            assert client.get("/predict", params=row).json() == {"prediction": expected[100]}

        assert podman("exec", c.name, "id", "-u").stdout.strip() == UID
        top = podman("top", c.name, "huser", "args").stdout.splitlines()[1:]
        assert [line.split(None, 1)[0] for line in top] == [UID], top  # the server itself
        assert podman("inspect", "--format", "{{.Config.User}}", c.name).stdout.strip() \
            == f"{UID}:{UID}"
        # The image's HEALTHCHECK made it into the image, and passes on a ready gateway.
        health = podman("healthcheck", "run", c.name, check=False)
        assert health.returncode == 0, health.stdout + health.stderr

        # gRPC, published from the container: the health service and the stock client.
        assert c.grpc is not None
        with grpc.insecure_channel(c.grpc) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        client = tc.InferenceServerClient(c.grpc)
        try:
            inp = tc.InferInput("input", list(rows.shape), "FP64")
            inp.set_data_from_numpy(rows)
            labels = client.infer("iris", [inp]).as_numpy("label")
            assert [b.decode() for b in labels] == expected
        finally:
            client.close()


async def _requests_then_sigterm(c: Container, models: Models) -> tuple[list[Any], list[Any]]:
    """POSTs of 100, 3 x 1,024 and 32 x 1 rows, in that order, each on its own connection, all
    received (in flight or answered, seen on /metrics: on a loaded machine the first may be
    answered before the last arrives), then SIGTERM to the container; their outcomes and
    expected answers."""
    rng = np.random.default_rng(11)
    bodies = [np.round(rng.uniform([4, 2, 1, 0], [8, 4.5, 7, 2.5], size=(n, 4)), 3)
              for n in [100] + [1024] * 3 + [1] * 32]
    clients = [httpx.AsyncClient(base_url=c.url, timeout=60) for _ in bodies]
    try:
        for client in clients:  # each connection accepted before its request
            assert (await client.get("/healthz")).status_code == 200
        posts = [asyncio.ensure_future(client.post("/v1/models/slow/predict",
                                                   json={"instances": rows.tolist()}))
                 for client, rows in zip(clients, bodies, strict=True)]
        async with httpx.AsyncClient(base_url=c.url, timeout=10) as probe:
            for _ in range(2000):
                text = (await probe.get("/metrics")).text
                busy = metric_sum(text, "gateway_requests_in_flight") - 1  # less this one
                answered = metric_sum(text, "gateway_requests_total",
                                      route="/v1/models/{name}/predict")
                if busy + answered >= len(posts) and metric_sum(
                        text, "gateway_model_calls_total") > 0:
                    break
            else:
                raise AssertionError("the requests never were all received")
        await asyncio.to_thread(podman, "kill", "--signal", "TERM", c.name)
        outcomes = await asyncio.gather(*posts, return_exceptions=True)
    finally:
        for client in clients:
            await client.aclose()
    return outcomes, [models.slow.predict(rows).tolist() for rows in bodies]


def test_sigterm_answers_every_request_in_flight_and_exits_0(image: str,
                                                               models: Models) -> None:
    env = {"GATEWAY_SHUTDOWN_GRACE_S": "2", "GATEWAY_MAX_QUEUE_ROWS": "8192"}
    with container(image, models.root, env) as c:
        c.wait_ready()
        start = time.monotonic()
        outcomes, expected = asyncio.run(_requests_then_sigterm(c, models))
        status = podman("wait", c.name, timeout=60).stdout.strip()
        print(f"answers {[getattr(o, 'status_code', o) for o in outcomes]}, exit status "
              f"{status}, {time.monotonic() - start:.1f} s from the requests to the exit")
        for outcome, answer in zip(outcomes, expected, strict=True):
            assert isinstance(outcome, httpx.Response), f"no answer: {outcome!r}"
            if outcome.status_code == 200:
                assert outcome.json()["predictions"] == answer
            else:
                assert outcome.status_code == 503, outcome.text
                assert outcome.json()["error"]["code"] == "shutting_down", outcome.text
        # Not all 9 s of work fit in the grace period. (Which requests do depends on the
        # machine's load: on an idle one the first, 0.3 s of work, gets its 200.)
        assert 503 in [o.status_code for o in outcomes]
        assert status == c.state("ExitCode") == "0", c.logs()
        assert "Exception in ASGI application" not in c.logs()


# -- compose.yaml ------------------------------------------------------------------------------

PODMAN_COMPOSE = ("podman-compose==1.6.0 --hash=sha256:"
                  "98e48af25d44c10ecef948163bfcca002e32aa8bbb7e66593fbd4faff7270c30")
"""Pinned and hashed here, not in the locks: only this test uses it. Its dependencies (PyYAML,
python-dotenv) are in requirements/dev.lock."""

STAND_INS = {
    # The official image builds redis without protected mode: its clients are on a network.
    "redis": """
FROM {base}
RUN apt-get update && apt-get install -y --no-install-recommends redis-server \\
 && rm -rf /var/lib/apt/lists/* \\
 && printf '#!/bin/sh\\nexec "$@" --protected-mode no\\n' >/usr/local/bin/entry \\
 && chmod +x /usr/local/bin/entry
ENTRYPOINT ["/usr/local/bin/entry"]
CMD ["redis-server"]
""",
    # The unprivileged image's nginx.conf includes conf.d/*.conf in its http block, as
    # Debian's does; Debian's own default site goes. wget: the compose healthcheck's.
    "nginx": """
FROM {base}
RUN apt-get update && apt-get install -y --no-install-recommends nginx wget \\
 && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/default
CMD ["nginx", "-g", "daemon off;"]
""",
}


@pytest.fixture(scope="module")
def podman_compose(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the pinned podman-compose is (for PYTHONPATH), installed with pip into a
    directory of this test's own."""
    where = tmp_path_factory.mktemp("podman-compose")
    (where / "requirements.txt").write_text(PODMAN_COMPOSE + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--require-hashes", "--target", str(where / "lib"),
                    "-r", str(where / "requirements.txt")],
                   check=True, capture_output=True, timeout=300)
    return where / "lib"


def _stand_in(name: str, tmp_path: Path) -> str:
    tag = f"localhost/gateway-test-{name}:bookworm"
    context = tmp_path / name
    context.mkdir()
    (context / "Containerfile").write_text(STAND_INS[name].format(base=BASE_IMAGE))
    podman("build", *ULIMITS, "--pull=never", "--format", "docker", "--tag", tag, str(context),
           timeout=600)
    return tag


def _containers(project: str, service: str) -> list[str]:
    return podman("ps", "--all", "--filter", f"label=io.podman.compose.project={project}",
                  "--filter", f"label=io.podman.compose.service={service}",
                  "--format", "{{.Names}}").stdout.split()


def _healthy(name: str, attempts: int = 300) -> None:
    """Run the container's healthcheck until it passes (at most ``attempts`` times, 0.1 s
    apart): podman runs healthchecks on systemd timers, which this machine has not."""
    for _ in range(attempts):
        if podman("healthcheck", "run", name, check=False).returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"{name} never healthy: {podman('logs', name, check=False).stderr}")


def test_compose_serves_through_nginx_from_replicas_sharing_redis(
        image: str, podman_compose: Path, tmp_path: Path) -> None:
    override = {"services": {"redis": {"image": _stand_in("redis", tmp_path)},
                             "models": {"image": image},
                             "gateway": {"image": image},
                             "nginx": {"image": _stand_in("nginx", tmp_path)}}}
    (tmp_path / "override.yaml").write_text(yaml.safe_dump(override))
    project = f"gateway-test-{os.getpid()}-{secrets.token_hex(3)}"
    port, grpc_port = free_port(), free_port()
    compose = [sys.executable, "-m", "podman_compose", "--project-name", project,
               "--podman-args", " ".join(PODMAN[1:]), "--podman-run-args", " ".join(ULIMITS),
               "--file", str(ROOT / "compose.yaml"), "--file", str(tmp_path / "override.yaml")]
    env = {**os.environ, "PYTHONPATH": str(podman_compose), "NGINX_PORT": str(port),
           "NGINX_GRPC_PORT": str(grpc_port)}
    try:
        start = time.monotonic()
        up = subprocess.run([*compose, "up", "--detach", "--no-build"], env=env, timeout=300,
                            capture_output=True, text=True)
        assert up.returncode == 0, up.stdout + up.stderr
        gateways = _containers(project, "gateway")
        assert len(gateways) == 3, gateways  # deploy.replicas
        (models,) = _containers(project, "models")
        (nginx,) = _containers(project, "nginx")
        (redis,) = _containers(project, "redis")
        for name in [*gateways, redis, nginx]:  # compose.yaml's healthchecks, each passing
            _healthy(name)
        print(f"compose up, all healthy: {time.monotonic() - start:.1f} s")
        assert podman("inspect", "--format", "{{.State.ExitCode}}", models).stdout.strip() == "0"

        rows, _ = iris_data()
        expected = train_iris().predict(rows).tolist()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            assert client.get("/readyz").json()["cache"]["l2"] == "ok"
            r = client.post("/v1/models/iris/predict", json={"instances": rows.tolist()})
            assert r.status_code == 200, r.text
            assert r.json()["predictions"] == expected
            # One new row, again and again: the first replica computes it, another finds it in
            # Redis (nginx goes round the three).
            row = dict(zip(IRIS_FEATURES, [5.05, 3.35, 1.45, 0.25], strict=True))
            tiers = []
            for _ in range(12):
                answer = client.get("/predict", params=row)
                assert answer.status_code == 200, answer.text
                assert answer.json() == {"prediction": "setosa"}
                tiers.append(answer.headers["x-cache"])
                if tiers[-1] == "l2":
                    break
            assert tiers[0] == "miss" and tiers[-1] == "l2", tiers
            assert client.get("/metrics").status_code == 404  # not public behind nginx
        # gRPC through nginx's h2c front: the health service, the stock client.
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        triton = tc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        try:
            inp = tc.InferInput("input", list(rows.shape), "FP64")
            inp.set_data_from_numpy(rows)
            assert [b.decode() for b in triton.infer("iris", [inp]).as_numpy("label")] == expected
        finally:
            triton.close()
        upstreams = set(re.findall(r"upstream=(\S+)", podman("logs", nginx).stdout))
        assert len(upstreams) >= 2, upstreams
    finally:
        down = subprocess.run([*compose, "down", "--volumes"], env=env, timeout=120,
                              capture_output=True, text=True)
        assert down.returncode == 0, down.stdout + down.stderr
        assert _containers(project, "gateway") == []
