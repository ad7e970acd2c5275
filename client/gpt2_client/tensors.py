"""The ``gpt2.v1.Tensor`` codec: numpy arrays to and from shape + dtype + little-endian row-major
bytes, for float32, float16 and bfloat16.

Pure numpy (no torch): the server encodes with it and the client decodes with it. numpy has no
bfloat16, so bfloat16 travels as the top 16 bits of each float32 (rounded to nearest even) and
decodes by shifting them back.
"""

from __future__ import annotations

import enum
import math

import numpy as np
import numpy.typing as npt

from gpt2_client.proto import introspection_pb2 as pb

FloatArray = npt.NDArray[np.float32]


class TensorDtype(enum.Enum):
    """How a tensor travels; every kind decodes to float32."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"  # half the bytes; beyond +-65504 becomes +-inf
    BFLOAT16 = "bfloat16"  # half the bytes; float32's range, 8 bits of mantissa


DTYPE_TO_PROTO = {
    TensorDtype.FLOAT32: pb.TENSOR_DTYPE_FLOAT32,
    TensorDtype.FLOAT16: pb.TENSOR_DTYPE_FLOAT16,
    TensorDtype.BFLOAT16: pb.TENSOR_DTYPE_BFLOAT16,
}
DTYPE_FROM_PROTO = {value: key for key, value in DTYPE_TO_PROTO.items()}
ITEM_BYTES = {TensorDtype.FLOAT32: 4, TensorDtype.FLOAT16: 2, TensorDtype.BFLOAT16: 2}

_BF16_NAN = np.uint16(0x7FC0)


def float32_to_bfloat16_bits(values: npt.ArrayLike) -> npt.NDArray[np.uint16]:
    """bfloat16 bit patterns of ``values``: round to nearest even, NaN stays a (quiet) NaN."""
    x = np.ascontiguousarray(values, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), _BF16_NAN, rounded)


def bfloat16_bits_to_float32(bits: npt.NDArray[np.uint16]) -> FloatArray:
    """The float32 values of bfloat16 bit patterns (exact: bfloat16 is a float32 prefix)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def encode_tensor(values: npt.ArrayLike, dtype: TensorDtype = TensorDtype.FLOAT32) -> pb.Tensor:
    """A Tensor message holding ``values`` (any real array) as ``dtype``."""
    x = np.asarray(values, dtype=np.float32)
    if dtype is TensorDtype.FLOAT32:
        data = x.astype("<f4", copy=False).tobytes(order="C")
    elif dtype is TensorDtype.FLOAT16:
        with np.errstate(over="ignore"):  # beyond float16's range is +-inf, as documented
            data = x.astype("<f2").tobytes(order="C")
    else:
        data = float32_to_bfloat16_bits(x).astype("<u2", copy=False).tobytes(order="C")
    return pb.Tensor(shape=list(x.shape), dtype=DTYPE_TO_PROTO[dtype], data=data)


def decode_tensor(message: pb.Tensor) -> FloatArray:
    """The float32 array of a Tensor message (a new, writable array). Raises ValueError when the
    dtype is unknown or the data does not match the shape."""
    dtype = DTYPE_FROM_PROTO.get(message.dtype)
    if dtype is None:
        raise ValueError(f"unknown tensor dtype {message.dtype}")
    shape = tuple(int(n) for n in message.shape)
    expected = math.prod(shape) * ITEM_BYTES[dtype]
    if len(message.data) != expected:
        raise ValueError(
            f"tensor of shape {list(shape)} and dtype {dtype.value} needs {expected} bytes, got {len(message.data)}"
        )
    if dtype is TensorDtype.FLOAT32:
        array = np.frombuffer(message.data, dtype="<f4").astype(np.float32)
    elif dtype is TensorDtype.FLOAT16:
        array = np.frombuffer(message.data, dtype="<f2").astype(np.float32)
    else:
        array = bfloat16_bits_to_float32(np.frombuffer(message.data, dtype="<u2").astype(np.uint16))
    return array.reshape(shape)
