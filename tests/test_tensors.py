"""The gpt2.v1.Tensor codec: byte layout, round trips for float32/float16/bfloat16, and bfloat16
rounding checked against torch's own conversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gpt2_client.proto import introspection_pb2 as pb
from gpt2_client.tensors import TensorDtype, decode_tensor, encode_tensor, float32_to_bfloat16_bits

# Largest relative error of one rounding: half a unit in the last place of each format.
RELATIVE_ERROR = {TensorDtype.FLOAT32: 0.0, TensorDtype.FLOAT16: 2.0**-11, TensorDtype.BFLOAT16: 2.0**-8}


def test_bytes_are_little_endian_row_major() -> None:
    message = encode_tensor(np.array([[1.0, 2.0], [3.0, -0.5]], dtype=np.float32))
    assert list(message.shape) == [2, 2] and message.dtype == pb.TENSOR_DTYPE_FLOAT32
    assert message.data == b"".join(np.array([v], dtype="<f4").tobytes() for v in (1.0, 2.0, 3.0, -0.5))
    assert message.data[:4] == b"\x00\x00\x80\x3f"  # 1.0f, least significant byte first


@pytest.mark.parametrize(
    ("dtype", "one"),
    [(TensorDtype.FLOAT16, b"\x00\x3c"), (TensorDtype.BFLOAT16, b"\x80\x3f")],
    ids=["float16", "bfloat16"],
)
def test_half_precision_uses_two_little_endian_bytes(dtype: TensorDtype, one: bytes) -> None:
    message = encode_tensor(np.ones((3,), dtype=np.float32), dtype)
    assert message.data == one * 3


@pytest.mark.parametrize("dtype", list(TensorDtype), ids=lambda d: d.value)
@pytest.mark.parametrize("shape", [(), (5,), (2, 3), (2, 3, 4, 5)], ids=str)
def test_round_trip_keeps_shape_and_values_within_one_rounding(dtype: TensorDtype, shape: tuple[int, ...]) -> None:
    values = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    decoded = decode_tensor(encode_tensor(values, dtype))
    assert decoded.shape == shape and decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, values, rtol=RELATIVE_ERROR[dtype], atol=0)


def test_bfloat16_rounds_like_torch_including_inf_and_nan() -> None:
    values = np.random.default_rng(1).standard_normal(10_000).astype(np.float32) * 1e3
    values = np.concatenate([values, np.array([np.inf, -np.inf, 0.0, -0.0, 3.4e38, 1e-40], dtype=np.float32)])
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(float32_to_bfloat16_bits(values), expected)
    nan = decode_tensor(encode_tensor(np.array([np.nan], dtype=np.float32), TensorDtype.BFLOAT16))
    assert np.isnan(nan).all()


def test_float16_overflow_is_infinite_as_documented() -> None:
    decoded = decode_tensor(encode_tensor(np.array([1e6, -1e6], dtype=np.float32), TensorDtype.FLOAT16))
    assert decoded.tolist() == [np.inf, -np.inf]


def test_causal_mask_survives_every_dtype() -> None:
    scores = np.triu(np.full((3, 3), -np.inf, dtype=np.float32), k=1) + np.tril(np.ones((3, 3), dtype=np.float32))
    for dtype in TensorDtype:
        np.testing.assert_array_equal(decode_tensor(encode_tensor(scores, dtype)), scores)


def test_data_that_does_not_match_the_shape_is_an_error() -> None:
    message = pb.Tensor(shape=[2, 2], dtype=pb.TENSOR_DTYPE_FLOAT32, data=b"\x00" * 12)
    with pytest.raises(ValueError, match="needs 16 bytes, got 12"):
        decode_tensor(message)
    with pytest.raises(ValueError, match="unknown tensor dtype"):
        decode_tensor(pb.Tensor(shape=[1], data=b"\x00" * 4))
