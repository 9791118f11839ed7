"""The bench's own logic: Lua generation (run by real wrk), Zipf sampler, scraping, report."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest

from bench import lua
from bench.report import aggregate, checks, to_markdown
from bench.runner import CEILING, Run
from bench.scrape import Counters, parse_counters
from bench.wrk import parse_output
from bench.zipf import ZipfSampler
from model_store.demo import IRIS_FEATURES as FEATURES


def test_zipf_sampler_follows_the_law() -> None:
    z = ZipfSampler(10_000, 1.1, seed=3)
    h = (1.0 / np.arange(1, 10_001) ** 1.1).sum()
    assert z.probabilities[0] == pytest.approx(1 / h)
    assert z.probabilities[1] / z.probabilities[0] == pytest.approx(2 ** -1.1)
    draws = z.sample(200_000)
    assert draws.min() >= 0 and draws.max() < 10_000
    freq0 = np.mean(draws == 0)
    assert freq0 == pytest.approx(1 / h, rel=0.05)
    assert np.mean(draws == 1) < freq0
    with pytest.raises(ValueError):
        ZipfSampler(0, 1.1)


def test_unique_rows_never_collide_across_salts_threads_and_counters() -> None:
    # Mirror of the Lua row(): the first feature carries the unique offset.
    seen = set()
    for salt in (1, 2, 599):
        for tid in (0, 1):
            for n in (1, 2, 39, 40, 41, 10**6):
                k = (salt * 16 + tid) * 10_000_000 + n
                value = f"{4 + (n % 40) / 10 + k * 1e-12:.12f}"
                seen.add((float(value), n % 25, n % 60))
    assert len(seen) == 3 * 2 * 6
    with pytest.raises(ValueError):
        lua.unique(lua.MAX_SALT)


def test_scripts_carry_the_done_callback_and_percentiles() -> None:
    for script in (lua.hot((5.1, 3.5, 1.4, 0.2)), lua.unique(3), lua.multirow(4),
                   lua.zipf([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], [0.7, 1.0], 5)):
        assert "BENCH_JSON" in script and "done = function" in script
        assert "PERCENTILES = {1, 5," in script
    assert "sepal_length=5.1&sepal_width=3.5" in lua.hot((5.1, 3.5, 1.4, 0.2))
    assert '"POST", "/v1/models/iris/predict"' in lua.multirow(4)


def test_wrk_output_parsing() -> None:
    out = ("Running 1s test\nBENCH_JSON {\"requests\":100,\"duration_us\":2000000,"
           "\"errors\":{\"connect\":1,\"read\":0,\"write\":0,\"status\":2,\"timeout\":0},"
           "\"latency_us\":{\"50\":1200,\"99\":5000}}\n")
    r = parse_output(out)
    assert (r.requests, r.duration_s, r.errors, r.rps) == (100, 2.0, 3, 50.0)
    assert r.latency_us == {50.0: 1200, 99.0: 5000}
    with pytest.raises(ValueError):
        parse_output("nothing")


METRICS = """\
# TYPE gateway_model_calls_total counter
gateway_model_calls_total{model="iris",version="1"} 3.0
gateway_model_calls_total{model="iris",version="2"} 2.0
# TYPE gateway_model_rows_total counter
gateway_model_rows_total{model="iris",version="1"} 64.0
# TYPE gateway_cache_lookups_total counter
gateway_cache_lookups_total{result="hit",tier="l1"} 90.0
gateway_cache_lookups_total{result="miss",tier="l1"} 10.0
gateway_cache_lookups_total{result="hit",tier="l2"} 4.0
gateway_cache_lookups_total{result="miss",tier="l2"} 6.0
# TYPE gateway_coalesced_total counter
gateway_coalesced_total{model="iris"} 7.0
# TYPE gateway_redis_errors_total counter
gateway_redis_errors_total 1.0
"""


def test_metric_scraping_and_deltas() -> None:
    c = parse_counters(METRICS)
    assert c == Counters(model_calls=5, model_rows=64, coalesced=7, hits=94, lookups=100,
                         redis_errors=1)
    assert (c - Counters(model_calls=1, lookups=50)).lookups == 50


def _run(config: str, scenario: str, rps: float, rep: int = 0, p50: int = 1000,
         calls: float = 10, rows: float = 20) -> Run:
    return Run(config, scenario, rep, int(rps * 2), 2.0, 0, {50.0: p50, 90.0: p50 * 2,
                                                             99.0: p50 * 3},
               Counters(model_calls=calls, model_rows=rows, hits=5, lookups=10))


def test_report_math_medians_ratios_and_checks() -> None:
    runs = [
        _run(CEILING, "hot", 1000),
        _run("naive", "unique", 100, 0), _run("naive", "unique", 300, 1),
        _run("naive", "unique", 200, 2, p50=4000),
        _run("full", "unique", 2500, 0), _run("full", "unique", 2000, 1),
        _run("full", "unique", 3000, 2),
        _run("full", "hot", 600),
        Run("full", "burst", 0, 200, 0.05, 0, {}, Counters(model_calls=1, model_rows=1)),
    ]
    rows = {(r.config, r.scenario): r for r in aggregate(runs)}
    naive, full = rows[("naive", "unique")], rows[("full", "unique")]
    assert (naive.rps, naive.rps_min, naive.rps_max) == (200, 100, 300)
    assert naive.p50_ms == 1.0 and naive.p99_ms == 3.0
    assert full.vs_naive == pytest.approx(12.5)
    assert rows[("full", "hot")].vs_ceiling == pytest.approx(0.6)
    assert full.rows_per_call == pytest.approx(2.0) and full.hit_ratio == pytest.approx(0.5)
    verdicts = {c.name: c.passed for c in checks(list(rows.values()))}
    assert verdicts["unique: full vs naive throughput"] is True
    assert verdicts["hot: full vs bare-endpoint ceiling"] is True
    assert verdicts["burst: model calls for N identical new rows"] is True
    md = to_markdown(list(rows.values()), checks(list(rows.values())),
                     {"timestamp": "t", "command": "python -m bench", "duration_s": 2,
                      "warmup_s": 0, "repetitions": 3, "connections": 64})
    assert "| full | unique | 2,500 (2,000..3,000) |" in md
    assert re.search(r"\| unique: full vs naive throughput \| >= 10x \| 12\.5x \| met \|", md)


class _Checker(BaseHTTPRequestHandler):
    """Answers 200 only to well-formed scenario requests (four finite features per row)."""

    protocol_version = "HTTP/1.1"
    seen: ClassVar[set[str]] = set()
    received: ClassVar[list[int]] = [0]
    lock: ClassVar[threading.Lock] = threading.Lock()
    features: ClassVar[tuple[str, ...]] = FEATURES

    def _answer(self, ok: bool) -> None:
        self.send_response(200 if ok else 400)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        query = parse_qs(urlparse(self.path).query)
        ok = sorted(query) == sorted(self.features) and all(
            math.isfinite(float(v[0])) for v in query.values())
        with self.lock:
            self.seen.add(self.path)
            self.received[0] += 1
        self._answer(ok)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        rows = body["instances"]
        ok = len(rows) == 32 and all(len(r) == len(self.features) for r in rows)
        with self.lock:
            self.seen.update(json.dumps(r) for r in rows)
        self._answer(ok)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk missing (make test installs it)")
def test_generated_scripts_run_in_real_wrk(tmp_path) -> None:
    """Every generated script runs in wrk and sends only well-formed, for unique: new, rows."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Checker)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        heavy = tuple(f"f{i}" for i in range(20))
        for name, script, features in (
            ("hot", lua.hot((5.1, 3.5, 1.4, 0.2)), FEATURES),
            ("unique", lua.unique(7), FEATURES),
            ("multirow", lua.multirow(8), FEATURES),
            ("zipf", lua.zipf([[1.0, 2.0, 3.0, 4.0]], [1.0], 9), FEATURES),
            ("unique", lua.unique(10, heavy), heavy),
            ("multirow", lua.multirow(12, model="heavy", features=heavy), heavy),
        ):
            _Checker.features = features
            _Checker.seen = set()
            _Checker.received = [0]
            path = tmp_path / f"{name}.lua"
            path.write_text(script)
            out = subprocess.run(["wrk", "-t2", "-c2", "-d1s", "-s", str(path), url],
                                 capture_output=True, text=True, timeout=30, check=False)
            result = parse_output(out.stdout)
            assert result.requests > 0 and result.errors == 0, (name, out.stdout)
            if name == "unique":
                assert len(_Checker.seen) == _Checker.received[0]  # no row asked twice
            if name == "hot":
                assert len(_Checker.seen) == 1
    finally:
        server.shutdown()
        server.server_close()


def test_backend_timing_command(compiled_store, session_store, capsys) -> None:
    from bench.backends import main

    assert main(["--model-root", str(compiled_store), "--calls", "3"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\s+1\s+\d+\s+\d+\s+\d+x$", out, re.M), out
    assert re.search(r"^\s+64\s+\d+\s+\d+\s+\d+x$", out, re.M), out
    assert main(["--model-root", str(session_store), "--calls", "3"]) == 0
    assert "(not compiled)" in capsys.readouterr().out
