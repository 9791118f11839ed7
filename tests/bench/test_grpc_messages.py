"""gRPC request bodies for the bench, and the check of an answer."""

from __future__ import annotations

import numpy as np
import pytest

from bench.doors import HOT_ROW, unique_rows
from bench.grpc_messages import Bodies, check_answer, frame, infer_request
from gateway.protocols.proto import grpc_service_pb2 as pb


def _rows(body: bytes, dtype: str = "<f8") -> np.ndarray:
    request = pb.ModelInferRequest.FromString(body)
    (tensor,) = request.inputs
    return np.frombuffer(request.raw_input_contents[0], dtype).reshape(tuple(tensor.shape))


def test_unique_bodies_carry_the_rows_of_their_salt_and_index() -> None:
    bodies = Bodies("unique", "iris", 4, rows=32, salt=5)
    for i in (0, 1, 4095, 4096, 10_000):
        expected = unique_rows(5, i * 32, 32, 4)
        assert np.array_equal(_rows(bodies[i]), expected)
    request = pb.ModelInferRequest.FromString(bodies[3])
    assert (request.model_name, request.inputs[0].name, request.inputs[0].datatype) == (
        "iris", "input", "FP64")
    assert len({bodies[i] for i in range(5000)}) == 5000
    assert Bodies("unique", "iris", 4, salt=6)[0] != Bodies("unique", "iris", 4, salt=5)[0]


def test_hot_bodies_repeat_one_row_and_fp32_is_exact() -> None:
    hot = Bodies("hot", "forest", 4, rows=3, datatype="FP32", input_name="x")
    assert hot[0] is hot[7]
    assert np.array_equal(_rows(hot[0], "<f4"), np.repeat([HOT_ROW], 3, axis=0).astype("<f4"))
    unique = Bodies("unique", "forest", 4, datatype="FP32")
    assert np.array_equal(_rows(unique[9], "<f4"), unique_rows(0, 9, 1, 4))
    with pytest.raises(ValueError):
        Bodies("zipf", "iris", 4)
    with pytest.raises(ValueError):
        infer_request("iris", np.zeros((1, 4)), datatype="INT8")


def test_a_frame_is_a_flag_and_a_big_endian_length() -> None:
    assert frame(b"abc") == b"\0\0\0\0\x03abc"


def test_answers_are_checked_for_every_row() -> None:
    good = pb.ModelInferResponse(model_name="iris")
    good.outputs.add(name="label", datatype="BYTES", shape=[2])
    good.raw_output_contents.append(b"\x06\0\0\0setosa\x06\0\0\0setosa")
    assert check_answer(good.SerializeToString(), 2) is None
    assert "not 3 rows" in (check_answer(good.SerializeToString(), 3) or "")
    empty = pb.ModelInferResponse(model_name="iris")
    assert check_answer(empty.SerializeToString(), 1) == "no outputs"
    empty.outputs.add(name="label", datatype="INT64", shape=[1])
    assert "no values" in (check_answer(empty.SerializeToString(), 1) or "")
    assert "not a ModelInferResponse" in (check_answer(b"\xff\xff", 1) or "")
