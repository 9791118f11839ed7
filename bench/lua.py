"""wrk Lua scripts for the bench's loads (``bench.doors.Load``): every door, hot, unique and
zipf rows, one or many rows per request.

Every script ends with a ``done`` callback that prints one line ``BENCH_JSON {...}`` with the
request count, errors and latency percentiles (microseconds; 100 is wrk's measured maximum),
which ``bench.wrk`` parses. Unique rows are made from ``(SALT, wrk thread, counter)``: the key
``(SALT * 16 + tid) * 10**7 + n`` is written in base 4096 over the first four features as
``digit / 512`` (exact in FP32 and FP64, printed exactly with nine decimals). They differ
from the Python generator's rows (``bench.doors.unique_rows``, odd multiples of 1/1024) in
every one of those features, so the two never share a row; distinct for ``SALT < 65536``,
``n < 10**7`` per thread and run. V2 binary requests pack their tensor with LuaJIT's ``ffi``
(little-endian, as wrk runs on).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from bench.doors import Load, hot_row, path_of, zipf_rows
from bench.zipf import ZipfSampler

__all__ = ["MAX_SALT", "PERCENTILES", "script"]

PERCENTILES = (1, 5, 10, 20, 30, 40, 50, 60, 70, 75, 80, 85, 90, 95, 97.5, 99, 99.5, 99.9, 100)
MAX_SALT = 65536

_PRELUDE = """
tid = 0
local threads_started = 0
setup = function(thread)
  thread:set("tid", threads_started)
  threads_started = threads_started + 1
end
local F = #NAMES
"""

_ROW = """
local function row(n)
  local k = (SALT * 16 + tid) * 10000000 + n
  local v = {}
  for j = 1, F do
    local d
    if j <= 4 then d = math.floor(k / 4096 ^ (j - 1)) % 4096
    else d = (n * (2 * j - 1)) % 4096 end
    v[j] = string.format("%.9f", d / 512)
  end
  return v
end
"""

_QUERY = """
local function query(v)
  local parts = {}
  for j = 1, F do parts[j] = NAMES[j] .. "=" .. v[j] end
  return "/predict?" .. table.concat(parts, "&")
end
"""

_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  local parts = {}
  for _, p in ipairs(PERCENTILES) do
    local v = latency:percentile(p)
    if p == 100 then v = latency.max end
    table.insert(parts, string.format('"%s":%d', tostring(p), v))
  end
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"errors":{"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d},"latency_us":{%s}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    table.concat(parts, ",")))
end
"""

# Encoders: ``encode(rows)`` turns a list of rows (lists of number strings) into a request.
_ENCODE = {
    "get": """
local function encode(rows) return wrk.format("GET", query(rows[1])) end
""",
    "v1": """
local JSON = {["Content-Type"] = "application/json"}
local function encode(rows)
  local parts = {}
  for r = 1, #rows do parts[r] = "[" .. table.concat(rows[r], ",") .. "]" end
  return wrk.format("POST", PATH, JSON, '{"instances":[' .. table.concat(parts, ",") .. ']}')
end
""",
    "v2-json": """
local JSON = {["Content-Type"] = "application/json"}
local function encode(rows)
  local parts = {}
  for r = 1, #rows do parts[r] = table.concat(rows[r], ",") end
  return wrk.format("POST", PATH, JSON, HEAD .. table.concat(parts, ",") .. TAIL)
end
""",
    "v2-bin": """
local ffi = require("ffi")
local TENSOR = ffi.typeof(CTYPE .. "[?]")
local BIN = {["Content-Type"] = "application/octet-stream",
             ["Inference-Header-Content-Length"] = tostring(#HEADER)}
local function encode(rows)
  local buf = TENSOR(#rows * F)
  for r = 1, #rows do
    for j = 1, F do buf[(r - 1) * F + j - 1] = tonumber(rows[r][j]) end
  end
  return wrk.format("POST", PATH, BIN, HEADER .. ffi.string(buf, #rows * F * SIZE))
end
""",
}

_SOURCES = {
    "hot": """
local HOT = {%s}
local rows = {}
for r = 1, PER do rows[r] = HOT end
local REQUEST = encode(rows)
request = function() return REQUEST end
""",
    "unique": """
local counter = 0
request = function()
  local rows = {}
  for r = 1, PER do
    counter = counter + 1
    rows[r] = row(counter)
  end
  return encode(rows)
end
""",
    "zipf": """
local TABLE = {%s}
local cdf = {%s}
local n = #cdf
local function draw()
  local u = math.random()
  local lo, hi = 1, n
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if cdf[mid] < u then lo = mid + 1 else hi = mid end
  end
  return lo
end
init = function(args) math.randomseed(SALT * 7919 + tid) end
request = function()
  local rows = {}
  for r = 1, PER do rows[r] = TABLE[draw()] end
  return encode(rows)
end
""",
}

# GET of zipf rows: the paths are built once (the hot path of the closed-loop zipf load).
_GET_ZIPF = """
local PATHS = {}
for i, v in ipairs(TABLE) do PATHS[i] = query(v) end
request = function() return wrk.format("GET", PATHS[draw()]) end
"""


def _lua_str(s: str) -> str:
    return json.dumps(s)  # a JSON string of ASCII is a valid Lua string literal


def _values(row: Sequence[float]) -> str:
    return "{" + ",".join(_lua_str(repr(float(v))) for v in row) + "}"


def script(load: Load) -> str:
    """The wrk script sending ``load`` (its salt, features, door, rows per request).

    Raises ValueError for a salt outside ``[0, MAX_SALT)``.
    """
    if not 0 <= load.salt < MAX_SALT:
        raise ValueError(f"salt must be within [0, {MAX_SALT}), got {load.salt}")
    f = len(load.features)
    pct = ", ".join(repr(p) for p in PERCENTILES)
    names = ", ".join(_lua_str(n) for n in load.features)
    head = [f"SALT = {int(load.salt)}", f"PERCENTILES = {{{pct}}}", f"NAMES = {{{names}}}",
            f"PER = {int(load.rows)}", f"PATH = {_lua_str(path_of(load))}"]
    if load.door == "v2-json":
        prefix = json.dumps({"inputs": [{"name": load.v2_input, "shape": [load.rows, f],
                                         "datatype": load.v2_datatype, "data": [0]}]})
        cut = prefix.index('"data": [') + len('"data": [')
        head += [f"HEAD = {_lua_str(prefix[:cut])}", f"TAIL = {_lua_str(prefix[cut + 1:])}"]
    if load.door == "v2-bin":
        size = 8 if load.v2_datatype == "FP64" else 4
        header = json.dumps({"inputs": [{
            "name": load.v2_input, "shape": [load.rows, f], "datatype": load.v2_datatype,
            "parameters": {"binary_data_size": load.rows * f * size}}]})
        ctype = "double" if size == 8 else "float"
        head += [f"HEADER = {_lua_str(header)}", f"SIZE = {size}",
                 f"CTYPE = {_lua_str(ctype)}"]
    parts = ["\n".join(head), _PRELUDE, _ROW, _QUERY, _ENCODE[load.door]]
    if load.keys == "hot":
        parts.append(_SOURCES["hot"] % ",".join(
            _lua_str(repr(float(v))) for v in hot_row(f)[0]))
    elif load.keys == "unique":
        parts.append(_SOURCES["unique"])
    else:
        table = ",".join(_values(r) for r in zipf_rows(load.zipf_n, f).tolist())
        cdf = ",".join(f"{c:.17g}" for c in ZipfSampler(load.zipf_n, load.zipf_s).cdf)
        parts.append(_SOURCES["zipf"] % (table, cdf))
        if load.door == "get":
            parts.append(_GET_ZIPF)
    parts.append(_DONE)
    return "\n".join(parts)
