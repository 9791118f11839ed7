"""Request input: bounded body reading and validation of rows against a model's features.

Everything here raises a ``GatewayError`` naming what is wrong and where; nothing reaches the
model or the cache unless it is a finite float64 matrix of the right shape.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Iterable, Sequence
from itertools import chain
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import orjson
import simdjson

from gateway.errors import InvalidInput, MalformedJson

__all__ = ["json_document", "only_fields", "parse_instances", "parse_json", "parse_query",
           "parse_query_string", "parse_rows_body"]

# The JSON number grammar, ASCII only: no '_', no padding, no 'inf'/'nan', no other digits.
_NON_FINITE = frozenset({"nan", "inf", "infinity"})
_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
# Numbers of that grammar, each followed by a comma: a whole query's values in one match.
_NUMBERS = re.compile(rb"(?:-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?,)*")
_MAX_NUMBER_CHARS = 64  # the longest value a query parameter may hold


def parse_json(body: bytes, what: str = "body") -> Any:
    """``body`` parsed as JSON. Raises MalformedJson (400) when it is not JSON or an object
    names a key twice (which parsers disagree on); messages start with ``what``."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedJson(f"{what} is not valid JSON: {exc}") from None
    # Every key is followed by one ':'; colons elsewhere live only inside strings. So when the
    # colons equal the keys counted (an undercount at worst), no object repeated a key.
    if body.count(b":") != _count_keys(value):
        try:
            json.loads(body, object_pairs_hook=_unique_keys)
        except _DuplicateKey as exc:
            raise MalformedJson(f"{what} names key {exc.args[0]!r:.40} twice in one object",
                                code="duplicate_key") from None
    return value


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return out


def _count_keys(value: Any) -> int:
    t = type(value)
    if t is dict:
        return len(value) + sum(_count_keys(v) for v in value.values()
                                if type(v) is dict or type(v) is list)
    if t is list and value and (type(value[0]) is dict or type(value[0]) is list):
        return sum(_count_keys(v) for v in value if type(v) is dict or type(v) is list)
    return 0


def _number(value: Any, where: str) -> float:
    if type(value) is float:
        if math.isfinite(value):
            return value
        raise InvalidInput(f"{where}: {value} is not a finite number", code="non_finite")
    if type(value) is int:
        try:
            return float(value)
        except OverflowError:
            raise InvalidInput(f"{where}: {value} is out of float64 range",
                               code="non_finite") from None
    raise InvalidInput(f"{where}: expected a number, got {_kind(value)}", code="not_a_number")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _wrong_features(what: str, features: Sequence[str], given: Iterable[str]) -> InvalidInput:
    """What is missing and what is unknown (a few names of each), and where the model's
    features are listed: never the whole list, which may be hundreds of names."""
    names = set(map(str, given))
    missing = [f for f in features if f not in names]
    extra = sorted(names - set(features))
    parts = ([f"missing {_few(missing)}"] if missing else []) + (
        [f"unknown {_few(extra)}"] if extra else [])
    return InvalidInput(
        f"{what}: {'; '.join(parts) or 'not the model features'} (the model has "
        f"{len(features)} features, named by GET /v1/models)",
        code="wrong_features",
    )


def _few(names: Sequence[str], shown: int = 5) -> str:
    head = ", ".join(repr(n)[:66] for n in names[:shown])
    return head if len(names) <= shown else f"{head} and {len(names) - shown} more"


def parse_query_string(query: bytes, features: Sequence[str]) -> np.ndarray:
    """``parse_query`` over a raw query string (percent-encoding and ``+`` understood)."""
    text = query.decode("latin-1")
    if "%" in text or "+" in text:
        pairs: Iterable[tuple[str, str]] = parse_qsl(text, keep_blank_values=True)
    else:
        pairs = (
            (name, value) for name, _, value in (p.partition("=") for p in text.split("&") if p)
        )
    return parse_query(pairs, features)


def parse_query(pairs: Iterable[tuple[str, str]], features: Sequence[str]) -> np.ndarray:
    """One row from query parameters named exactly after ``features`` (any order)."""
    given: dict[str, str] = {}
    for name, raw in pairs:
        if name in given:
            raise InvalidInput(f"query parameter {name!r} given more than once",
                               code="duplicate_feature")
        given[name] = raw
    try:
        raws = [given[f] for f in features]
    except KeyError:
        raws = []
    if len(given) != len(features) or not raws:
        raise _wrong_features("query parameters", features, given)
    values = _numbers(raws)
    if values is not None:
        return np.array([values], dtype=np.float64)
    match = _NUMBER.fullmatch
    for name, raw in zip(features, raws, strict=True):
        if (len(raw) > _MAX_NUMBER_CHARS or not raw.isascii()
                or match(raw.encode()) is None):
            if raw.strip().lstrip("+-").lower() in _NON_FINITE:
                raise InvalidInput(f"query parameter {name}={raw!r:.70} is not a finite "
                                   "number", code="non_finite")
            raise InvalidInput(f"query parameter {name}={raw!r:.70} is not a number",
                               code="not_a_number")
    values = [float(raw) for raw in raws]
    for name, raw, value in zip(features, raws, values, strict=True):
        if not math.isfinite(value):
            raise InvalidInput(f"query parameter {name}={raw!r} is not a finite number",
                               code="non_finite")
    return np.array([values], dtype=np.float64)


def _numbers(raws: list[str]) -> list[float] | None:
    """``raws`` as floats when every one is a number of at most 64 characters by ``_NUMBER``
    and finite, checked in one pass; None: let the check value by value name the fault."""
    joined = ",".join(raws) + ","
    if (joined.count(",") != len(raws) or max(map(len, raws)) > _MAX_NUMBER_CHARS
            or not joined.isascii() or _NUMBERS.fullmatch(joined.encode()) is None):
        return None
    values = list(map(float, raws))
    return values if all(map(math.isfinite, values)) else None


_SCALARS = frozenset({int, float, str, bool, type(None)})
_parsers = threading.local()  # a simdjson parser per thread: one document alive at a time


def parse_rows_body(body: bytes, fields: frozenset[str], max_rows: int
                    ) -> tuple[dict[str, Any], np.ndarray] | None:
    """The usual rows body read at C speed, without a Python object per number: a JSON object
    naming only ``fields``, each once, with no escaped string, whose ``instances`` is a list of
    1 to ``max_rows`` lists of numbers, all of one length, and whose other fields are scalars.
    Those other fields, and the rows (float64, finite, one per instance). None for any other
    body, valid or not: ``parse_json`` and ``parse_instances`` then decide, and name what is
    wrong; where this answers, they answer the same."""
    if b"\\" in body or body.count(b"{") != 1:
        return None
    doc = json_document(body)
    instances: Any = None
    try:
        if type(doc) is not simdjson.Object:
            return None
        if not only_fields(doc, fields):
            return None
        instances = doc.get("instances")
        if type(instances) is not simdjson.Array:
            return None
        count = len(instances)
        # The instances' lists are the body's only lists besides their own: no list nested.
        if not 0 < count <= max_rows or body.count(b"[") != count + 1:
            return None
        try:
            width = len(instances[0])
            if not width or any(len(row) != width  # type: ignore[arg-type]  # TypeError
                                for row in instances):
                return None
            flat = np.frombuffer(instances.as_buffer(of_type="d"), dtype=np.float64)
        except TypeError:  # an instance that is not a list, a value that is not a number
            return None
        others = {name: doc.get(name) for name in doc.keys() if name != "instances"}
        if not _SCALARS.issuperset(map(type, others.values())):
            return None
    finally:
        del doc, instances  # the parser refuses a new document while one is referenced
    rows = flat.reshape(count, width)
    if not np.isfinite(rows).all():
        return None
    return others, rows


def only_fields(obj: Any, allowed: frozenset[str]) -> bool:
    """Does the simdjson ``Object`` ``obj`` name only ``allowed`` fields, each once (simdjson
    keeps a repeated key; ``parse_json`` refuses it)?"""
    names = list(obj.keys())
    return len(names) == len(set(names)) and allowed.issuperset(names)


def json_document(body: bytes) -> Any:
    """``body`` parsed by this thread's simdjson parser (an ``Object``, an ``Array`` or a
    scalar); None if it is not JSON, holds a number beyond float64 or 64-bit integer range,
    or starts with a byte order mark (which ``parse_json`` refuses). The caller drops every
    ``Object`` and ``Array`` of it before the thread parses again."""
    if body.startswith(b"\xef\xbb\xbf"):
        return None
    parser = getattr(_parsers, "parser", None)
    if parser is None:
        parser = _parsers.parser = simdjson.Parser()
    try:
        return parser.parse(body)
    except ValueError:
        return None
    except RuntimeError:  # an integer beyond 64 bits, or an earlier document still referenced
        parser = _parsers.parser = simdjson.Parser()
    try:
        return parser.parse(body)
    except (ValueError, RuntimeError):
        return None


def parse_instances(instances: Any, features: Sequence[str], max_rows: int) -> np.ndarray:
    """Rows from ``instances``: a non-empty list of lists (features in order) or of objects
    keyed by feature name; at most ``max_rows``."""
    if not isinstance(instances, list):
        raise InvalidInput(f"instances: expected a list of rows, got {_kind(instances)}",
                           code="invalid_instances")
    if not instances:
        raise InvalidInput("instances: at least one row is required", code="empty_instances")
    if len(instances) > max_rows:
        raise InvalidInput(f"instances: {len(instances)} rows exceed the limit of {max_rows}",
                           code="too_many_rows")
    n_features = len(features)
    fast = _fast_rows(instances, n_features)
    if fast is not None:
        return fast
    out = np.empty((len(instances), n_features), dtype=np.float64)
    for i, row in enumerate(instances):
        if isinstance(row, list):
            if len(row) != n_features:
                raise InvalidInput(
                    f"instances[{i}]: expected {n_features} values "
                    f"({', '.join(features)}), got {len(row)}",
                    code="wrong_feature_count",
                )
            for j, value in enumerate(row):
                out[i, j] = _number(value, f"instances[{i}][{j}] ({features[j]})")
        elif isinstance(row, dict):
            if len(row) != n_features or any(f not in row for f in features):
                raise _wrong_features(f"instances[{i}]: keys", features, row)
            for j, name in enumerate(features):
                out[i, j] = _number(row[name], f"instances[{i}].{name}")
        else:
            raise InvalidInput(f"instances[{i}]: expected a list or an object, got {_kind(row)}",
                               code="invalid_instances")
    return out


_NUMBER_TYPES = frozenset({int, float})
_LIST_TYPE = frozenset({list})


def _fast_rows(instances: list[Any], n_features: int) -> np.ndarray | None:
    """The common case at C speed: lists of ints and floats of the right length, all finite.
    None: let the row-by-row path find and name what is wrong."""
    if set(map(type, instances)) != _LIST_TYPE:
        return None
    if not set(map(type, chain.from_iterable(instances))) <= _NUMBER_TYPES:
        return None
    try:
        out = np.array(instances, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        return None
    if out.ndim != 2 or out.shape[1] != n_features or not np.isfinite(out).all():
        return None
    return out
