"""``bench.replicas``: config rendering, a clear error without nginx, and one short real run."""

from __future__ import annotations

import json
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


@pytest.mark.e2e
@pytest.mark.slow
def test_a_short_run_measures_the_three_configurations(nginx: str, tmp_path: Path,
                                                       session_store: Path) -> None:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.replicas", "--model-root", str(session_store),
         "--duration", "1", "--repetitions", "1", "--connections", "4", "--json", str(out)],
        capture_output=True, text=True, timeout=110, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"direct", "nginx+1", "nginx+2"}
    for name, (run,) in result["runs"].items():
        assert run["errors"] == 0 and run["rps"] > 0, name
        assert (run["nginx_cpu_us_per_request"] > 0) == (name != "direct")
    assert len(result["hop_us_p50"]) == 1
    assert "nginx hop, added p50 latency at 1 connection" in proc.stdout
