"""Signed INT4 / INT2 integers packed into bytes exactly as ONNX stores them.

ONNX (and therefore sfc's QDQ writer, the TensorRT plugin inputs and the Triton kernels)
stores a sub-byte tensor as its row-major (C order) flattening packed into uint8:

- INT4: two elements per byte, the first in the low nibble: ``x0 & 0xF | (x1 & 0xF) << 4``.
- INT2: four elements per byte: ``x0 | x1 << 2 | x2 << 4 | x3 << 6`` (each ``& 0x3``).

Values are two's complement in their field. When the element count is not a multiple of
the elements per byte, the last byte is zero-padded. Packing runs over the flattened
tensor, so for a [K, N] weight a byte straddles two rows when N is not a multiple of 2
(INT4) or 4 (INT2); the kernels index the flat element number, so they handle that too.

These functions are the one place sfc packs; ``onnx.numpy_helper.from_array`` on an
``ml_dtypes.int4`` / ``int2`` array gives the same bytes (a test checks it).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import SfcError

__all__ = [
    "pack",
    "pack_int2",
    "pack_int4",
    "packed_size",
    "unpack",
    "unpack_int2",
    "unpack_int4",
]

_SUPPORTED_BITS = (2, 4)


def _check_bits(bits: int) -> None:
    if bits not in _SUPPORTED_BITS:
        raise SfcError(f"packing supports 4 and 2 bits, not {bits!r}")


def packed_size(count: int, bits: int) -> int:
    """Bytes that hold `count` elements of `bits` bits (ceil(count * bits / 8))."""
    _check_bits(bits)
    if count < 0:
        raise SfcError(f"element count must be >= 0, not {count}")
    return -(-count * bits // 8)


def _as_ints(q: np.ndarray, bits: int) -> np.ndarray:
    """`q` flattened (C order) as int16 after checking its dtype and range."""
    q = np.asarray(q)
    if q.dtype.kind not in "iu":  # floats would be silently truncated; bools are no weights
        raise SfcError(f"INT{bits} packing needs an integer array, not {q.dtype}")
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if q.size and (int(q.min()) < lo or int(q.max()) > hi):
        raise SfcError(f"INT{bits} values must lie in [{lo}, {hi}], got "
                       f"[{int(q.min())}, {int(q.max())}]")
    return q.reshape(-1).astype(np.int16)


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    per_byte = 8 // bits
    flat = _as_ints(q, bits)
    fields = (flat & ((1 << bits) - 1)).astype(np.uint8)  # two's complement in the field
    padded = np.zeros(packed_size(flat.size, bits) * per_byte, dtype=np.uint8)
    padded[: fields.size] = fields
    groups = padded.reshape(-1, per_byte)
    out = np.zeros(groups.shape[0], dtype=np.uint8)
    for i in range(per_byte):
        out |= groups[:, i] << np.uint8(i * bits)
    return out


def _unpack(packed: np.ndarray, shape: tuple[int, ...], bits: int) -> np.ndarray:
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise SfcError(f"packed INT{bits} data must be uint8, not {packed.dtype}")
    if any(d < 0 for d in shape):
        raise SfcError(f"shape {shape} has a negative dimension")
    count = math.prod(shape)
    expected = packed_size(count, bits)
    if packed.size != expected:
        raise SfcError(f"{packed.size} packed bytes do not hold an INT{bits} tensor of shape "
                       f"{shape} ({expected} bytes)")
    per_byte = 8 // bits
    flat = packed.reshape(-1)
    fields = np.stack([(flat >> np.uint8(i * bits)) & np.uint8((1 << bits) - 1)
                       for i in range(per_byte)], axis=1).reshape(-1)[:count]
    # Sign-extend the field: values with the top bit set are negative.
    signed = fields.astype(np.int8) - ((fields >> np.uint8(bits - 1)).astype(np.int8) << bits)
    return signed.astype(np.int8).reshape(shape)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Integers in [-8, 7] (any shape) packed two per byte, first in the low nibble.

    Returns a 1-D uint8 array of ceil(q.size / 2) bytes (ONNX INT4 raw data).
    """
    return _pack(q, 4)


def pack_int2(q: np.ndarray) -> np.ndarray:
    """Integers in [-2, 1] (any shape) packed four per byte as x0 | x1<<2 | x2<<4 | x3<<6.

    Returns a 1-D uint8 array of ceil(q.size / 4) bytes (ONNX INT2 raw data).
    """
    return _pack(q, 2)


def unpack_int4(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The int8 tensor of `shape` that `pack_int4` packed into `packed`."""
    return _unpack(packed, tuple(int(d) for d in shape), 4)


def unpack_int2(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The int8 tensor of `shape` that `pack_int2` packed into `packed`."""
    return _unpack(packed, tuple(int(d) for d in shape), 2)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """`pack_int4` or `pack_int2` by `bits`."""
    _check_bits(bits)
    return _pack(q, bits)


def unpack(packed: np.ndarray, shape: tuple[int, ...], bits: int) -> np.ndarray:
    """`unpack_int4` or `unpack_int2` by `bits`."""
    _check_bits(bits)
    return _unpack(packed, tuple(int(d) for d in shape), bits)
