"""Requests for every door of the gateway, as complete HTTP/1.1 bytes, built before a run.

A *load* names the door (``GET /predict``, ``POST /v1/models/{m}/predict``, V2 infer in JSON
or in binary tensor form), the rows per request and which rows (one ``hot`` row again and
again, a ``unique`` row never asked before, or rows drawn from a fixed ``zipf`` set).
``build`` turns it into ``n`` request byte strings that the load generator writes as they
are, so no request is encoded while the clock runs.

Unique rows come from ``unique_rows``: every value is an odd multiple of 1/1024 in [0, 8),
exact in FP32 and FP64 alike, so a row stays distinct whatever datatype a V2 server is sent,
and never equals a row of the wrk scripts (``bench.lua``), whose values are not such
multiples. Rows are distinct for distinct ``(salt, index)`` with ``salt < 2**16`` and
``index < 2**32``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import orjson

from bench.zipf import ZipfSampler

__all__ = ["DOORS", "HOT_ROW", "Load", "build", "path_of", "unique_rows", "zipf_rows"]

Door = Literal["get", "v1", "v2-json", "v2-bin"]
Keys = Literal["hot", "unique", "zipf"]
DOORS: tuple[Door, ...] = ("get", "v1", "v2-json", "v2-bin")
HOT_ROW = (5.1, 3.5, 1.4, 0.2)
_DTYPES = {"FP64": "<f8", "FP32": "<f4"}
MAX_SALT = 2 ** 16


@dataclass(frozen=True)
class Load:
    """What the requests of one run look like."""

    door: Door
    keys: Keys
    features: tuple[str, ...]
    rows: int = 1  # rows per request (``get``: always 1)
    model: str = "iris"
    salt: int = 0  # unique rows: one salt per run, so runs never share a row
    v2_input: str = "input"  # V2: the input tensor's name
    v2_datatype: str = "FP64"  # V2: FP64 or FP32
    zipf_n: int = 10_000
    zipf_s: float = 1.1
    seed: int = 0  # zipf draws
    extra_headers: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.door not in DOORS:
            raise ValueError(f"door must be one of {', '.join(DOORS)}, got {self.door!r}")
        if self.door == "get" and self.rows != 1:
            raise ValueError("GET /predict carries one row per request")
        if self.rows < 1:
            raise ValueError(f"rows per request must be >= 1, got {self.rows}")
        if self.v2_datatype not in _DTYPES:
            raise ValueError(f"v2 datatype must be FP64 or FP32, got {self.v2_datatype!r}")
        if not 0 <= self.salt < MAX_SALT:
            raise ValueError(f"salt must be within [0, {MAX_SALT}), got {self.salt}")


def path_of(load: Load) -> str:
    """The request path of a POST door (``GET /predict`` carries its query per row)."""
    if load.door == "v1":
        return f"/v1/models/{load.model}/predict"
    if load.door in ("v2-json", "v2-bin"):
        return f"/v2/models/{load.model}/infer"
    return "/predict"


def unique_rows(salt: int, start: int, count: int, n_features: int) -> np.ndarray:
    """Rows ``start .. start + count - 1`` of ``salt``: a ``(count, n_features)`` float64
    array. The row's key ``salt * 2**32 + index`` is written in base 4096 over the first
    four features (value ``(2 * digit + 1) / 1024``); further features repeat a pattern. (A
    model with fewer than four features sees keys repeat after ``4096**n_features`` rows.)"""
    idx = np.arange(start, start + count, dtype=np.uint64)
    key = np.uint64(salt) * np.uint64(2 ** 32) + idx
    out = np.empty((count, n_features), dtype=np.float64)
    for j in range(n_features):
        if j < 4:
            digit = (key >> np.uint64(12 * j)) & np.uint64(4095)
        else:
            digit = (idx * np.uint64(2 * j + 1)) % np.uint64(4096)
        out[:, j] = (2 * digit.astype(np.float64) + 1) / 1024
    return out


def zipf_rows(n: int, n_features: int) -> np.ndarray:
    """The fixed row set the ``zipf`` load draws from (the same as the wrk scripts')."""
    rng = np.random.default_rng(11)
    if n_features == 4:  # Iris-like ranges
        return np.round(rng.uniform([4, 2, 1, 0], [8, 4.5, 7, 2.5], size=(n, 4)), 2)
    return np.round(rng.normal(size=(n, n_features)), 2)


def hot_row(n_features: int) -> np.ndarray:
    """The one row of the ``hot`` load: the Iris example, or the zipf set's first row."""
    if n_features == len(HOT_ROW):
        return np.asarray([HOT_ROW], dtype=np.float64)
    return zipf_rows(1, n_features)


def _head(method: str, path: str, host: str, extra: Sequence[tuple[str, str]],
          body_len: int | None, content_type: str = "application/json") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in extra]
    if body_len is not None:
        lines += [f"Content-Type: {content_type}", f"Content-Length: {body_len}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _encode(load: Load, rows: np.ndarray, host: str) -> bytes:
    """One request carrying ``rows`` (``(load.rows, n_features)``)."""
    extra = list(load.extra_headers)
    if load.door == "get":
        query = "&".join(f"{n}={v!r}" for n, v in zip(load.features, rows[0].tolist(),
                                                       strict=True))
        return _head("GET", f"/predict?{query}", host, extra, None)
    path = path_of(load)
    if load.door == "v1":
        body = orjson.dumps({"instances": rows.tolist()})
        return _head("POST", path, host, extra, len(body)) + body
    shape = [int(rows.shape[0]), int(rows.shape[1])]
    dtype = _DTYPES[load.v2_datatype]
    if load.door == "v2-json":
        data = rows.astype(dtype).astype(np.float64).ravel().tolist()
        body = orjson.dumps({"inputs": [{"name": load.v2_input, "shape": shape,
                                         "datatype": load.v2_datatype, "data": data}]})
        return _head("POST", path, host, extra, len(body)) + body
    tensor = np.ascontiguousarray(rows, dtype=dtype).tobytes()
    header = orjson.dumps({"inputs": [{"name": load.v2_input, "shape": shape,
                                       "datatype": load.v2_datatype,
                                       "parameters": {"binary_data_size": len(tensor)}}]})
    extra.append(("Inference-Header-Content-Length", str(len(header))))
    body = header + tensor
    return _head("POST", path, host, extra, len(body), "application/octet-stream") + body


def build(load: Load, n: int, host: str) -> list[bytes]:
    """``n`` requests of ``load`` for a server at ``host`` (``"127.0.0.1:8000"``).

    ``hot`` repeats one byte string; ``unique`` builds ``n`` distinct ones; ``zipf`` builds
    each row of the set that is drawn once and repeats it as drawn.
    """
    f = len(load.features)
    per = load.rows
    if load.keys == "hot":
        one = _encode(load, np.repeat(hot_row(f), per, axis=0), host)
        return [one] * n
    if load.keys == "unique":
        rows = unique_rows(load.salt, 0, n * per, f).reshape(n, per, f)
        return [_encode(load, rows[i], host) for i in range(n)]
    table = zipf_rows(load.zipf_n, f)
    draws = ZipfSampler(load.zipf_n, load.zipf_s, seed=load.seed).sample(n * per)
    if per == 1:
        cache: dict[int, bytes] = {}
        out = []
        for i in draws.tolist():
            req = cache.get(i)
            if req is None:
                req = cache[i] = _encode(load, table[i:i + 1], host)
            out.append(req)
        return out
    picked = table[draws].reshape(n, per, f)
    return [_encode(load, picked[i], host) for i in range(n)]
