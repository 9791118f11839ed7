"""wrk Lua scripts for the scenarios.

Every script ends with a ``done`` callback that prints one line ``BENCH_JSON {...}`` with the
request count, errors and latency percentiles (microseconds), which ``bench.wrk`` parses.
Rows that must be new are made unique per wrk thread, per counter and per ``salt`` (one salt
per run), so repetitions and configurations never share a row.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

__all__ = ["MAX_SALT", "PERCENTILES", "hot", "multirow", "unique", "zipf"]

PERCENTILES = (1, 5, 10, 20, 30, 40, 50, 60, 70, 75, 80, 85, 90, 95, 97.5, 99, 99.5, 99.9, 100)

IRIS_FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")

_THREADS = """
local threads_started = 0
setup = function(thread)
  thread:set("tid", threads_started)
  threads_started = threads_started + 1
end
"""

# A unique row for (SALT, tid, n): the first feature carries an offset k * 1e-12 that stays
# below the 0.1 spacing of its base values (k < 1e11: SALT < 600, tid < 16, n < 1e7), printed
# with 12 decimals so the gateway parses a distinct float for every k; the other features vary
# over [0, 6) in steps of 0.1.
_ROW = """
local function row(n)
  local k = (SALT * 16 + tid) * 10000000 + n
  local v = {string.format("%.12f", 4 + (n % 40) / 10 + k * 1e-12)}
  for j = 2, #NAMES do
    v[j] = string.format("%.1f", ((n * (2 * j - 1)) % 60) / 10)
  end
  return v
end
local function query(v)
  local parts = {}
  for j = 1, #NAMES do parts[j] = NAMES[j] .. "=" .. v[j] end
  return "/predict?" .. table.concat(parts, "&")
end
"""

_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  local parts = {}
  for _, p in ipairs(PERCENTILES) do
    table.insert(parts, string.format('"%s":%d', tostring(p), latency:percentile(p)))
  end
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"errors":{"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d},"latency_us":{%s}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    table.concat(parts, ",")))
end
"""


def _prelude(salt: int, features: Sequence[str] = IRIS_FEATURES) -> str:
    pct = ", ".join(repr(p) for p in PERCENTILES)
    names = ", ".join(json.dumps(f) for f in features)
    return (f"tid = 0\nSALT = {int(salt)}\nPERCENTILES = {{{pct}}}\nNAMES = {{{names}}}\n"
            + _THREADS)


def _query(values: Sequence[str], features: Sequence[str]) -> str:
    return "&".join(f"{n}={v}" for n, v in zip(features, values, strict=True))


def _check_salt(salt: int) -> None:
    if not 0 <= salt < MAX_SALT:
        raise ValueError(f"salt must be within [0, {MAX_SALT}), got {salt}")


def hot(row: Sequence[float], features: Sequence[str] = IRIS_FEATURES) -> str:
    """Every request asks the same row."""
    path = "/predict?" + _query([repr(float(v)) for v in row], features)
    return _prelude(0, features) + f'local path = "{path}"\n' + (
        'request = function() return wrk.format("GET", path) end\n'
    ) + _DONE


MAX_SALT = 600


def unique(salt: int, features: Sequence[str] = IRIS_FEATURES) -> str:
    """Every request asks a row never asked before with another ``salt`` (0 <= salt < 600)."""
    _check_salt(salt)
    return _prelude(salt, features) + _ROW + """
local counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", query(row(counter)))
end
""" + _DONE


def zipf(rows: Sequence[Sequence[float]], cdf: Sequence[float], seed: int,
         features: Sequence[str] = IRIS_FEATURES) -> str:
    """Rows drawn from a fixed set with the given cumulative distribution (``bench.zipf``)."""
    paths = json.dumps(["/predict?" + _query([repr(float(v)) for v in r], features)
                        for r in rows])
    cdf_lua = ",".join(f"{c:.17g}" for c in cdf)
    return _prelude(seed, features) + f"""
local paths = {{{paths[1:-1]}}}
local cdf = {{{cdf_lua}}}
local n = #cdf
init = function(args) math.randomseed(SALT * 7919 + tid) end
request = function()
  local u = math.random()
  local lo, hi = 1, n
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if cdf[mid] < u then lo = mid + 1 else hi = mid end
  end
  return wrk.format("GET", paths[lo])
end
""" + _DONE


def multirow(salt: int, rows_per_request: int = 32, model: str = "iris",
             features: Sequence[str] = IRIS_FEATURES) -> str:
    """POST ``/v1/models/<model>/predict`` with ``rows_per_request`` new rows each."""
    _check_salt(salt)
    return _prelude(salt, features) + _ROW + f"""
local counter = 0
local per = {int(rows_per_request)}
local headers = {{["Content-Type"] = "application/json"}}
request = function()
  local parts = {{}}
  for j = 1, per do
    counter = counter + 1
    parts[j] = "[" .. table.concat(row(counter), ",") .. "]"
  end
  return wrk.format("POST", "/v1/models/{model}/predict", headers,
                    '{{"instances":[' .. table.concat(parts, ",") .. ']}}')
end
""" + _DONE
