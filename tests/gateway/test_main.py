"""``python -m gateway``: serving options reach uvicorn; bad ones exit with a clear error."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

import gateway.__main__ as cli
from gateway.metrics import MULTIPROC_ENV
from gateway.server import GatewayHttpProtocol, gateway_config
from tests.deploy.support import NGINX_DIR, nginx_seconds, parse_nginx


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch,
           session_store: Path) -> Iterator[list[dict[str, Any]]]:
    """``gateway.server.run`` replaced by a recorder of the uvicorn configuration it would
    serve; SIGTERM's handler and ``PROMETHEUS_MULTIPROC_DIR`` restored afterwards."""
    calls: list[dict[str, Any]] = []

    def record(app: str, *, settings: Any = None, **kw: Any) -> int:
        config = gateway_config(settings, app, **kw)
        calls.append({"app": app, **kw, "factory": config.factory, "loop": config.loop,
                      "http": config.http, "access_log": config.access_log})
        return 0

    monkeypatch.setattr(cli, "run", record)
    monkeypatch.setattr(cli, "address_error", lambda _host, _port: None)  # 8000 may be taken
    monkeypatch.setenv("GATEWAY_MODEL_ROOT", str(session_store))
    monkeypatch.setenv(MULTIPROC_ENV, "unset-below")
    monkeypatch.delenv(MULTIPROC_ENV)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        yield calls
    finally:
        signal.signal(signal.SIGTERM, handler)


def test_keep_alive_outlasts_nginx_upstream_keepalive() -> None:
    """The gateway must never close an idle connection nginx may be about to reuse."""
    assert cli.build_parser().get_default("timeout_keep_alive") == cli.KEEP_ALIVE_S
    for conf in ("gateway.conf", "sidecar.conf"):
        (upstream,) = [d for d in parse_nginx((NGINX_DIR / conf).read_text()).find("upstream")
                       if d.args == ["gateway"]]
        nginx_idle = nginx_seconds(upstream.one("keepalive_timeout").args[0])
        assert nginx_idle < cli.KEEP_ALIVE_S, conf


def test_tcp_defaults(served: list[dict[str, Any]]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([])
    assert exit_.value.code == 0
    (kw,) = served
    assert kw["app"] == "gateway.app:from_env" and kw["factory"] is True
    assert (kw["host"], kw["port"]) == ("127.0.0.1", 8000) and "uds" not in kw
    assert kw["timeout_keep_alive"] == cli.KEEP_ALIVE_S
    assert kw["proxy_headers"] is True and kw["forwarded_allow_ips"] is None
    assert (kw["loop"], kw["http"], kw["access_log"]) == ("uvloop", GatewayHttpProtocol, False)
    assert MULTIPROC_ENV not in os.environ  # one process: plain metrics


def test_unix_socket_and_proxy_options(served: list[dict[str, Any]], tmp_path: Path) -> None:
    sock = tmp_path / "gateway.sock"
    with pytest.raises(SystemExit):
        cli.main(["--uds", str(sock), "--timeout-keep-alive", "90", "--no-proxy-headers",
                  "--forwarded-allow-ips", "*"])
    (kw,) = served
    assert kw["uds"] == str(sock) and "host" not in kw and "port" not in kw
    assert kw["timeout_keep_alive"] == 90
    assert kw["proxy_headers"] is False and kw["forwarded_allow_ips"] == "*"
    assert not sock.exists()  # the writability probe leaves nothing behind


def test_several_workers_share_a_metrics_dir_of_the_servers_own(
    served: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen: list[tuple[uvicorn.Config, Path]] = []

    def serve_workers(config: uvicorn.Config, directory: Path) -> int:
        assert directory.is_dir()
        assert os.environ[MULTIPROC_ENV] == str(directory)  # inherited by the workers
        seen.append((config, directory))
        return len(seen) + 1  # the supervisor's exit status

    monkeypatch.setattr(cli, "serve_workers", serve_workers)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--workers", "3", "--port", "9001", "--timeout-worker-healthcheck", "2"])
    assert exit_.value.code == 2
    ((config, directory),) = seen
    assert directory.parent == tmp_path
    assert (config.workers, config.port, config.timeout_keep_alive) == (3, 9001, cli.KEEP_ALIVE_S)
    assert config.timeout_worker_healthcheck == 2
    assert not directory.exists() and MULTIPROC_ENV not in os.environ

    parent = tmp_path / "given"  # a directory set by the user is the parent of the server's
    parent.mkdir()
    monkeypatch.setenv(MULTIPROC_ENV, str(parent))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--workers", "2"])
    assert exit_.value.code == 3
    assert seen[1][0].timeout_worker_healthcheck == 5  # uvicorn's default
    assert seen[1][1].parent == parent and os.environ[MULTIPROC_ENV] == str(parent)
    assert list(parent.iterdir()) == []


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_bad_options_exit_with_a_clear_error(
    served: list[dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert "--workers: expected an integer >= 1, got 0" in _refused(capsys, ["--workers", "0"])
    assert "--timeout-worker-healthcheck: expected an integer >= 1, got 0" in _refused(
        capsys, ["--workers", "2", "--timeout-worker-healthcheck", "0"])
    missing = tmp_path / "missing" / "gateway.sock"
    err = _refused(capsys, ["--uds", str(missing)])
    assert f"--uds: cannot create a socket at {missing}: No such file or directory" in err
    assert "must exist and be writable" in err
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert "Not a directory" in _refused(capsys, ["--uds", str(a_file / "gateway.sock")])
    assert f"{a_file} exists and is not a socket" in _refused(capsys, ["--uds", str(a_file)])
    err = _refused(capsys, ["--uds", "/sys/gateway.sock"])  # not writable, even for root
    assert "cannot create a socket at /sys/gateway.sock" in err
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path / "nowhere"))
    err = _refused(capsys, ["--workers", "2"])
    assert f"{MULTIPROC_ENV}={tmp_path / 'nowhere'}: not a writable directory" in err
    assert served == []


def test_a_port_out_of_range_is_refused(
        served: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(capsys, ["--port", "99999"])
    assert "--port: expected a port from 1 to 65535, got 99999" in err
    assert served == []


def test_an_address_in_use_or_unknown_is_named() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.address_error("127.0.0.1", port) == (
            f"cannot listen on 127.0.0.1:{port}: Address already in use")
    assert cli.address_error("127.0.0.1", port) is None  # free again
    assert "no.such.host.invalid" in (cli.address_error("no.such.host.invalid", 8000) or "")


@pytest.mark.e2e
def test_the_cli_refuses_a_port_in_use_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "gateway", "--port", str(port)],
                              capture_output=True, text=True, timeout=60, check=False,
                              env={**os.environ, "GATEWAY_MODEL_ROOT": str(tmp_path)})
    assert proc.returncode == 2
    assert proc.stderr == (f"python -m gateway: cannot listen on 127.0.0.1:{port}: Address "
                           "already in use\n")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write any directory")
def test_a_read_only_directory_is_refused(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        assert "Permission denied" in (cli.socket_path_error(tmp_path / "gateway.sock") or "")
    finally:
        tmp_path.chmod(0o700)


def test_an_existing_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "gateway.sock"
    with socket.socket(socket.AF_UNIX) as old:
        old.bind(str(path))
    assert cli.socket_path_error(path) is None and path.is_socket()


@pytest.mark.e2e
def test_the_cli_refuses_an_unusable_socket_before_loading_models(tmp_path: Path) -> None:
    missing = tmp_path / "missing" / "gateway.sock"
    proc = subprocess.run([sys.executable, "-m", "gateway", "--uds", str(missing)],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "GATEWAY_MODEL_ROOT": str(tmp_path)})
    assert proc.returncode == 2
    assert f"--uds: cannot create a socket at {missing}" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("env", "line"), [
    ({"GATEWAY_REDIS_URL": "localhost:6379"},
     "GATEWAY_REDIS_URL='localhost:6379': expected a URL starting with redis://"),
    ({"GATEWAY_REDIS_URL": "tcp://:S3cret@db:6379/0"},
     "GATEWAY_REDIS_URL='tcp://:***@db:6379/0': expected a URL starting with redis://"),
    ({"GATEWAY_MAX_BATCH_SIZE": "0"}, "GATEWAY_MAX_BATCH_SIZE='0': Input should be greater"),
    ({"GATEWAY_CACHE": "maybe"}, "GATEWAY_CACHE='maybe': Input should be 'on' or 'off'"),
    ({"GATEWAY_ADMIN_TOKEN": ""}, None),
    ({"GATEWAY_MODEL_ROOT": "/nonexistent/models"},
     "GATEWAY_MODEL_ROOT='/nonexistent/models': not a directory"),
    ({"GATEWAY_DEFAULT_MODEL": "churn"},
     "GATEWAY_DEFAULT_MODEL='churn': not in the store (it has iris)"),
    ({"GATEWAY_REDIS_ULR": "redis://127.0.0.1:6379/0"},
     "GATEWAY_REDIS_ULR: not a setting (did you mean GATEWAY_REDIS_URL?)"),
    ({"GATEWAY_NO_SUCH_THING": "1"}, "GATEWAY_NO_SUCH_THING: not a setting; the settings are"),
])
def test_bad_settings_are_one_line_each_and_exit_2(
    served: list[dict[str, Any]], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], line: str | None,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if line is None:  # an empty token is a token: accepted
        with pytest.raises(SystemExit) as ok:
            cli.main([])
        assert ok.value.code == 0
        return
    err = _refused(capsys, [])
    assert err.count("\n") == 1 and err.startswith("python -m gateway: " + line), err
    assert "S3cret" not in err and "Traceback" not in err
    assert served == []
