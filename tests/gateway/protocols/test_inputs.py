"""Decoding rows: a wrong set of features is named briefly, whatever the model's width."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.errors import InvalidInput
from gateway.protocols.inputs import parse_instances, parse_query

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
