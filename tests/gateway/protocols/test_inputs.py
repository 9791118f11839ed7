"""Decoding rows: a wrong set of features is named briefly, whatever the model's width."""

from __future__ import annotations

import pytest

from gateway.errors import InvalidInput
from gateway.protocols.inputs import parse_query

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
