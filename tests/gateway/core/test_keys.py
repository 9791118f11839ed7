from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.keys import canonical_rows, key_head, row_keys

finite = st.floats(allow_nan=False, allow_infinity=False)
rows4 = st.lists(finite, min_size=4, max_size=4)


def key(row: list[float], *, digest: str = "d1", unit: str = "label@onnx") -> str:
    return row_keys(key_head("gw", "iris", digest, unit), canonical_rows(np.array([row])))[0]


@given(rows4)
def test_equal_rows_give_equal_keys(row: list[float]) -> None:
    assert key(row) == key([float(repr(v)) for v in row])
    assert key(row) == key([v + 0.0 for v in row])  # -0.0 folded


@given(rows4, rows4)
def test_different_rows_give_different_keys(a: list[float], b: list[float]) -> None:
    same = all((x + 0.0) == (y + 0.0) for x, y in zip(a, b, strict=True))
    assert (key(a) == key(b)) == same


@given(rows4)
def test_version_output_and_backend_are_part_of_the_key(row: list[float]) -> None:
    assert key(row, digest="d1") != key(row, digest="d2")
    assert key(row, unit="label@onnx") != key(row, unit="both@onnx")
    assert key(row, unit="label@onnx") != key(row, unit="label@sklearn")


def test_keys_of_a_block_equal_keys_of_its_rows() -> None:
    rows = canonical_rows(np.array([[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]]))
    head = key_head("gw", "iris", "d1", "label@onnx")
    assert row_keys(head, rows) == [row_keys(head, rows[i:i + 1])[0] for i in range(2)]


def test_key_layout_and_spellings() -> None:
    k = key([5.1, 3.5, 1.4, 0.2])
    prefix, model, digest, unit, h = k.split(":")
    assert (prefix, model, digest, unit, len(h)) == ("gw", "iris", "d1", "label@onnx", 32)
    assert key([5.10, 3.50, 1.4, 0.2]) == k
    assert key([-0.0, 0.0, 1.0, 2.0]) == key([0.0, -0.0, 1.0, 2.0])
    assert key([5, 3, 1, 0]) == key([5.0, 3.0, 1.0, 0.0])
