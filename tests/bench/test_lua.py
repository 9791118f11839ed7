"""The wrk scripts, run by real wrk against a server that checks each door's framing."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from bench import lua
from bench.doors import HOT_ROW, Load, build
from bench.loadgen import Settings, run
from bench.scenarios import SCENARIOS
from bench.wrk import parse_output
from tests.bench.checker import Expect, checking_server

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(shutil.which("wrk") is None,
                                 reason="wrk missing (make test installs it)")]

FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
HEAVY = tuple(f"f{i}" for i in range(20))
WRK_SCENARIOS = [s for s in SCENARIOS.values() if s.engine == "wrk"
                 and not s.needs_redis_control and s.connections is None]


def _wrk_many(tmp_path: Path, jobs: Sequence[tuple[str, Expect]], threads: int = 2) -> None:
    """Run each script in its own wrk (1 s, all at once) against its own checking server;
    every request must be well-formed and counted by both sides."""
    with contextlib.ExitStack() as stack:
        procs = []
        for i, (script, expect) in enumerate(jobs):
            path = tmp_path / f"script{i}.lua"
            path.write_text(script)
            url = stack.enter_context(checking_server(expect))
            procs.append(subprocess.Popen(
                ["wrk", f"-t{threads}", f"-c{threads}", "-d1s", "-s", str(path), url],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs = [p.communicate(timeout=60) for p in procs]
    for (_script, expect), (stdout, stderr) in zip(jobs, outs, strict=True):
        result = parse_output(stdout)
        assert result.errors == 0 and result.requests > 0, (expect.bad[:3], stdout, stderr)
        assert not expect.bad and expect.requests >= result.requests
        assert result.latency_us[100.0] > 0  # the measured maximum, not wrk's 0 for p100


def test_every_scenario_runs_in_wrk_well_formed(tmp_path: Path) -> None:
    jobs = [(lua.script(Load(sc.door, sc.keys, FEATURES, rows=sc.rows, salt=7)),
             Expect(sc.door, FEATURES, sc.rows)) for sc in WRK_SCENARIOS]
    _wrk_many(tmp_path, jobs)
    for sc, (_, expect) in zip(WRK_SCENARIOS, jobs, strict=True):
        if sc.keys == "unique":
            assert len(set(expect.seen)) == len(expect.seen), sc.name  # no row asked twice
        if sc.keys == "hot":
            assert set(expect.seen) == {HOT_ROW}, sc.name
        if sc.keys == "zipf":
            assert len(set(expect.seen)) > 1, sc.name


def test_fp32_tensors_and_a_wide_model_in_wrk(tmp_path: Path) -> None:
    loads = [Load("v2-bin", "unique", FEATURES, rows=32, salt=8, v2_datatype="FP32",
                  v2_input="input__0"),
             Load("v2-json", "unique", FEATURES, salt=8, v2_datatype="FP32"),
             Load("v2-bin", "unique", HEAVY, rows=32, model="heavy", salt=9),
             Load("get", "zipf", HEAVY, model="heavy", salt=9)]
    jobs = [(lua.script(load), Expect(load.door, load.features, load.rows, load.model))
            for load in loads]
    _wrk_many(tmp_path, jobs)
    for load, (_, expect) in zip(loads, jobs, strict=True):
        if load.keys == "unique":
            assert len(set(expect.seen)) == len(expect.seen)


def test_unique_rows_of_the_lua_never_collide_across_salts_threads_and_counters(
        tmp_path: Path) -> None:
    """The scripts' own ``row(n)``, run by wrk's threads, at counters chosen to cross the
    base-4096 digits, for the lowest and highest salts."""
    ns = [1, 2, 4095, 4096, 4097, 10 ** 6, 10 ** 7 - 1]
    override = (f"\nlocal NS = {{{','.join(map(str, ns))}}}\nlocal at = 0\n"
                "request = function()\n  at = at % #NS + 1\n"
                '  return wrk.format("GET", query(row(NS[at])))\nend\n')
    salts = (0, 1, lua.MAX_SALT - 1)
    jobs = [(lua.script(Load("get", "unique", FEATURES, salt=salt)) + override,
             Expect("get", FEATURES)) for salt in salts]
    _wrk_many(tmp_path, jobs, threads=2)
    distinct = set()
    for _, expect in jobs:
        rows = set(expect.seen)
        assert len(rows) == 2 * len(ns)  # every (thread, n) a row of its own
        distinct |= rows
    assert len(distinct) == len(salts) * 2 * len(ns)
    with pytest.raises(ValueError):
        lua.script(_with_salt(lua.MAX_SALT))


def _with_salt(salt: int) -> Load:
    load = Load("get", "unique", FEATURES)
    object.__setattr__(load, "salt", salt)  # past Load's own check, to reach the script's
    return load


def test_wrk_rows_and_generator_rows_never_coincide(tmp_path: Path) -> None:
    wrk_side = Expect("v1", FEATURES, 32)
    _wrk_many(tmp_path, [(lua.script(Load("v1", "unique", FEATURES, rows=32, salt=1)),
                          wrk_side)])
    py_side = Expect("v1", FEATURES, 32)
    load = Load("v1", "unique", FEATURES, rows=32, salt=1)
    with checking_server(py_side) as url:
        run(build(load, 200, url.removeprefix("http://")),
            Settings(url=url, rate=1000, duration_s=0.2, connections=2))
    assert len(py_side.seen) == 200 * 32
    assert not set(wrk_side.seen) & set(py_side.seen)
