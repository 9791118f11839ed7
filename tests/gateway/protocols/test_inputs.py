"""Decoding rows: a wrong set of features is named briefly, whatever the model's width."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import GatewayError, InvalidInput
from gateway.protocols.inputs import (
    parse_instances,
    parse_json,
    parse_query,
    parse_rows_body,
)

FEATURES = [f"feature_{i:02d}" for i in range(30)]


def test_wrong_features_name_what_is_missing_and_unknown_not_every_feature() -> None:
    given = [(f, "1.0") for f in FEATURES[2:]] + [("colour", "3")]
    with pytest.raises(InvalidInput) as info:
        parse_query(given, FEATURES)
    message = info.value.message
    assert message == ("query parameters: missing 'feature_00', 'feature_01'; unknown "
                       "'colour' (the model has 30 features, named by GET /v1/models)")
    assert info.value.code == "wrong_features"


def test_many_missing_features_are_counted_not_listed() -> None:
    with pytest.raises(InvalidInput) as info:
        parse_query([("feature_00", "1")], FEATURES)
    assert info.value.message.startswith(
        "query parameters: missing 'feature_01', 'feature_02', 'feature_03', 'feature_04', "
        "'feature_05' and 24 more (the model has 30 features")
    assert len(info.value.message) < 200


IRIS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def _query(*values: str) -> list[tuple[str, str]]:
    return list(zip(IRIS, values, strict=True))


def test_query_values_of_the_json_number_grammar_are_read() -> None:
    rows = parse_query(_query("0", "-1.5e3", "2.5E-3", "10"), IRIS)
    assert rows.tolist() == [[0.0, -1500.0, 0.0025, 10.0]] and rows.dtype == np.float64


# (value given for sepal_width, the message, the code): each read value by value, as ever.
QUERY_FAULTS = [
    ("1,2", "query parameter sepal_width='1,2' is not a number", "not_a_number"),
    ("01", "query parameter sepal_width='01' is not a number", "not_a_number"),
    ("+1", "query parameter sepal_width='+1' is not a number", "not_a_number"),
    (" 1", "query parameter sepal_width=' 1' is not a number", "not_a_number"),
    ("1_0", "query parameter sepal_width='1_0' is not a number", "not_a_number"),
    ("\uff11", "query parameter sepal_width='\uff11' is not a number", "not_a_number"),
    ("1" * 65, f"query parameter sepal_width={'1' * 65!r:.70} is not a number", "not_a_number"),
    ("", "query parameter sepal_width='' is not a number", "not_a_number"),
    ("nan", "query parameter sepal_width='nan' is not a finite number", "non_finite"),
    ("1e999", "query parameter sepal_width='1e999' is not a finite number", "non_finite"),
]


@pytest.mark.parametrize(("value", "message", "code"), QUERY_FAULTS,
                         ids=[c[1][24:60] for c in QUERY_FAULTS])
def test_each_query_fault_is_named(value: str, message: str, code: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_query(_query("5.1", value, "1.4", "0.2"), IRIS)
    assert (info.value.message, info.value.code) == (message, code)


def test_a_value_that_is_no_number_is_named_before_an_overflow_earlier() -> None:
    with pytest.raises(InvalidInput) as info:
        parse_query(_query("1e999", "1.0", "abc", "0.2"), IRIS)
    assert info.value.message == "query parameter petal_length='abc' is not a number"


def test_instances_of_mixed_rows_are_refused_row_by_row() -> None:
    rows = [[5.1, 3.5, 1.4, 0.2], {"sepal_length": 1}]
    with pytest.raises(InvalidInput) as info:
        parse_instances(rows, IRIS, max_rows=10)
    assert info.value.code == "wrong_features"
    assert info.value.message.startswith("instances[1]: keys: missing 'sepal_width'")
    with pytest.raises(InvalidInput) as info:
        parse_instances([[5.1, 3.5, 1.4, 0.2], [1, True, 3, 4]], IRIS, max_rows=10)
    assert info.value.message == "instances[1][1] (sepal_width): expected a number, got a boolean"
    assert parse_instances([[5, 3.5, 1, 0.2]] * 2, IRIS, max_rows=10).tolist() == [
        [5.0, 3.5, 1.0, 0.2]] * 2


# -- the rows body read at C speed ------------------------------------------------------------

V1_FIELDS = frozenset({"instances", "version", "probabilities"})


def _whole_decoding(body: bytes, fields: frozenset[str], max_rows: int
                    ) -> tuple[dict[str, Any], np.ndarray] | None:
    """What ``parse_json`` and ``parse_instances`` make of ``body`` where the fast read is
    meant to agree (an object of ``fields``, instances of one width), else None."""
    try:
        payload = parse_json(body)
    except GatewayError:
        return None
    if type(payload) is not dict or not fields.issuperset(payload) \
            or type(payload.get("instances")) is not list or not payload["instances"] \
            or type(payload["instances"][0]) is not list:
        return None
    width = len(payload["instances"][0])
    try:
        rows = parse_instances(payload["instances"], [f"f{i}" for i in range(width)], max_rows)
    except GatewayError:
        return None
    return {k: v for k, v in payload.items() if k != "instances"}, rows


def _same(fast: tuple[dict[str, Any], np.ndarray], whole: tuple[dict[str, Any], np.ndarray]
          ) -> bool:
    return (fast[0] == whole[0] and all(type(fast[0][k]) is type(whole[0][k]) for k in fast[0])
            and fast[1].shape == whole[1].shape and fast[1].tobytes() == whole[1].tobytes())


numbers = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.sampled_from([0.0, -0.0, 1e-400, 5e-324, 1.7976931348623157e308]),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=4),
                    st.floats(allow_nan=False, allow_infinity=False))


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """V1 bodies as clients write them, some of them subtly wrong (ragged, nested, typed
    values, duplicate or unknown keys, odd spacing, byte-level damage)."""
    width = draw(st.integers(1, 4))
    rows = draw(st.lists(st.lists(numbers, min_size=width, max_size=width), min_size=1,
                         max_size=5))
    text = [json.dumps(r) for r in rows]
    if draw(st.booleans()):  # one row made wrong
        i = draw(st.integers(0, len(text) - 1))
        text[i] = draw(st.sampled_from(["[]", "[1]", "[[1]]", "[true]", '["1"]', "[null]",
                                        "{}", "1", "[1, 2, 3, 4, 5]", "[1e999]", "[-]"]))
    fields = [f'"instances": [{", ".join(text)}]']
    for name in draw(st.lists(st.sampled_from(["version", "probabilities", "extra",
                                               "instances"]), max_size=3)):
        fields.append(f"{json.dumps(name)}: {json.dumps(draw(scalars))}")
    fields = draw(st.permutations(fields))
    body = ("{" + draw(st.sampled_from([",", " , ", ",\n"])).join(fields) + "}").encode()
    if draw(st.booleans()):  # byte-level damage
        at = draw(st.integers(0, len(body)))
        cut = draw(st.integers(0, 2))
        body = body[:at] + draw(st.sampled_from(
            [b"", b" ", b"[", b"]", b",", b"{", b"\\", b"\xef\xbb\xbf", b"\x00", b"\xff", b'"',
             b"1", b"-", b".", b"e", b"true"])) + body[at + cut:]
    return body


@given(bodies(), st.integers(1, 6))
@settings(max_examples=400, deadline=None)
def test_the_fast_read_of_a_rows_body_answers_only_as_the_whole_decoding_does(
        body: bytes, max_rows: int) -> None:
    fast = parse_rows_body(body, V1_FIELDS, max_rows)
    if fast is not None:
        whole = _whole_decoding(body, V1_FIELDS, max_rows)
        assert whole is not None, body
        assert _same(fast, whole), body


def test_the_fast_read_takes_the_usual_bodies_and_leaves_the_rest() -> None:
    rows = np.arange(64 * 100, dtype=np.float64).reshape(64, 100) / 7 - 300
    body = orjson.dumps({"instances": rows.tolist(), "probabilities": True})
    others, got = parse_rows_body(body, V1_FIELDS, 1024) or ({}, np.empty(0))
    assert others == {"probabilities": True} and got.tobytes() == rows.tobytes()
    assert parse_rows_body(body, V1_FIELDS, 63) is None  # too many rows: named elsewhere
    assert parse_rows_body(body, frozenset({"instances"}), 1024) is None
    for wrong in (b'{"instances": [[1, [2]], [3, 4]]}', b'{"instances": [[1, 2], [3]]}',
                  b'{"instances": [[1, 2]], "version": 1, "version": 2}',
                  b'{"instances": [{"a": 1}]}', b'\xef\xbb\xbf{"instances": [[1]]}',
                  b'{"instances": [[1e400]]}', b'{"instances": [[1]], "version": "\\u0031"}'):
        assert parse_rows_body(wrong, V1_FIELDS, 1024) is None, wrong
    for _ in range(3):  # one document at a time, whatever was returned before
        assert parse_rows_body(b'{"instances": [[1, 2]]}', V1_FIELDS, 4) is not None
