"""Per-model settings: validation and their manifest form."""

from __future__ import annotations

import pytest

from model_store import ModelSettings


def test_only_the_fields_set_are_written() -> None:
    assert ModelSettings().to_json() == {} and not ModelSettings()
    s = ModelSettings(max_batch_size=8, execution="inline")
    assert s and s.to_json() == {"max_batch_size": 8, "execution": "inline"}
    assert ModelSettings.from_json(s.to_json()) == s
    assert ModelSettings.from_json(None) == ModelSettings()


@pytest.mark.parametrize(("data", "message"), [
    ({"max_batch_size": 0}, "max_batch_size: 0 is out of range (1..65536)"),
    ({"max_batch_size": 65537}, "out of range"),
    ({"max_batch_delay_us": -1}, "max_batch_delay_us: -1 is out of range (0..1000000)"),
    ({"max_batch_delay_us": 1_000_001}, "out of range"),
    ({"infer_concurrency": 65}, "infer_concurrency: 65 is out of range (1..64)"),
    ({"cache_ttl_s": 0}, "cache_ttl_s: 0 is out of range (>= 1)"),
    ({"max_batch_size": True}, "max_batch_size: expected an integer, got True"),
    ({"max_batch_size": 8.0}, "expected an integer"),
    ({"max_batch_size": "8"}, "expected an integer"),
    ({"execution": "later"}, "execution: expected one of auto, inline, thread"),
    ({"batch_size": 8}, "unknown 'batch_size'"),
    ([8], "settings: expected an object"),
])
def test_values_out_of_range_or_unknown_are_refused(data: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelSettings.from_json(data)  # type: ignore[arg-type]


def test_update_and_unset() -> None:
    s = ModelSettings(max_batch_size=8, cache_ttl_s=60)
    assert s.updated({"execution": "thread"}, ("cache_ttl_s",)) == ModelSettings(
        max_batch_size=8, execution="thread")
    assert s.updated({}, ("max_batch_size", "cache_ttl_s")) == ModelSettings()
    with pytest.raises(ValueError, match="unknown 'nope'"):
        s.updated({}, ("nope",))
