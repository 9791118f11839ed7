"""``bench.replicas``: config rendering, a clear error without nginx, the core sets, and one
short real run of the four configurations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bench.replicas as replicas
from tests.deploy.support import NGINX_DIR, parse_nginx


def test_render_replaces_only_listen_addresses_and_upstream_servers(tmp_path: Path) -> None:
    site = replicas.render_site(NGINX_DIR / "gateway.conf", listen="127.0.0.1:1234",
                                upstreams=["127.0.0.1:1", "127.0.0.1:2"])
    conf = parse_nginx(site)
    shipped = parse_nginx((NGINX_DIR / "gateway.conf").read_text())
    (upstream,) = conf.find("upstream")
    assert [d.args for d in upstream.find("server")] == [
        ["127.0.0.1:1", "max_fails=1", "fail_timeout=5s"],
        ["127.0.0.1:2", "max_fails=1", "fail_timeout=5s"]]
    assert [d for d in upstream.block or [] if d.name != "server"] == [
        d for d in shipped.find("upstream")[0].block or [] if d.name != "server"]
    assert conf.find("server")[0].one("listen").args == ["127.0.0.1:1234"]
    assert conf.find("server")[0].find("location") == shipped.find("server")[0].find("location")

    sidecar = replicas.render_site(NGINX_DIR / "sidecar.conf", listen="127.0.0.1:1",
                                   upstreams=["unix:/x.sock"], metrics_listen="127.0.0.1:2")
    assert [s.one("listen").args for s in parse_nginx(sidecar).find("server")] == [
        ["127.0.0.1:1"], ["127.0.0.1:2"]]

    changed = tmp_path / "changed.conf"
    changed.write_text((NGINX_DIR / "gateway.conf").read_text().replace("listen 8080;", ""))
    with pytest.raises(ValueError, match="listen 8080"):
        replicas.render_site(changed, listen="x", upstreams=["y"])


def test_missing_nginx_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replicas.shutil, "which", lambda _name: None)
    monkeypatch.setattr(replicas.os, "access", lambda _path, _mode: False)
    with pytest.raises(RuntimeError, match=r"nginx not found: install it \(apt-get install nginx"):
        replicas.nginx_binary()


def test_core_sets() -> None:
    cores = os.cpu_count() or 1
    assert replicas.parse_cpus("0") == {0} and replicas.parse_cpus("all") is None
    if cores >= 2:
        assert replicas.parse_cpus("0-1") == replicas.parse_cpus("1,0") == {0, 1}
    for bad in (str(cores), "x", "", "1-"):
        with pytest.raises(ValueError):
            replicas.parse_cpus(bad)
    assert replicas._server_cpus(None, {0}) == (set(range(1, cores)) or None)
    assert replicas._server_cpus("all", {0}) is None
    assert replicas._server_cpus(None, None) is None  # wrk anywhere: the servers too


@pytest.mark.e2e
@pytest.mark.slow
def test_a_short_run_measures_the_four_configurations(nginx: str, tmp_path: Path,
                                                      session_store: Path) -> None:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.replicas", "--model-root", str(session_store),
         "--duration", "1", "--repetitions", "1", "--connections", "4", "--json", str(out)],
        capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"1 worker", "2 workers", "nginx+1", "nginx+2"}
    assert result["wrk_cpus"] == [0]
    for name, (run,) in result["runs"].items():
        assert run["errors"] == 0 and run["hot_rps"] > 0 and run["unique_rps"] > 0, name
        assert run["hot_gateway_cpu_us_per_request"] > 0, name
        assert (run["hot_nginx_cpu_us_per_request"] > 0) == name.startswith("nginx"), name
    assert set(result["ratios"]) == {"2 workers / 1 worker", "nginx+2 / 1 worker"}
    assert all(len(v) == 1 for by_load in result["ratios"].values() for v in by_load.values())
    assert len(result["hop_us_p50"]) == 1
    assert "2 workers / 1 worker, throughput ratio per repetition" in proc.stdout
    assert "nginx hop, added p50 latency at 1 connection" in proc.stdout
