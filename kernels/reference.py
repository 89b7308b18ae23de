"""numpy references for the low-bit GEMM kernels (the numerics the kernels must match).

Weight-only GEMMs (W4A16, W2A16) take the exact initializers sfc's QDQ writer emits for a
MatMul weight W [K, N] block-quantized along K (axis 0):

- ``packed_w``: the ONNX raw data of the row-major [K, N] INT4 / INT2 tensor
  (``sfc.kernels.packing``), uint8 of ceil(K * N * bits / 8) bytes;
- ``scales``: [ceil(K / block_size), N]; element (k, n) dequantizes with
  ``scales[k // block_size, n]``.

They compute ``y = x @ (q * scales repeated block_size times along K, cut to K)`` in float64
(DequantizeLinear followed by MatMul, without intermediate rounding) and return float32.

W8A8 takes int8 activations with one scale and int8 weights with one scale per output
channel (per-channel on N, as sfc quantizes MatMul weights); the integer accumulation is
exact (int64, checked to fit int32 as the kernels accumulate in int32).
"""

from __future__ import annotations

import numpy as np

from ..errors import SfcError
from .packing import unpack

__all__ = [
    "dequantize_blockwise",
    "int_gemm_int32",
    "w2a16_gemm",
    "w4a16_gemm",
    "w8a8_gemm",
]


def _check_weight(packed_w: np.ndarray, scales: np.ndarray, k: int, n: int,
                  block_size: int) -> None:
    if k <= 0 or n <= 0:
        raise SfcError(f"weight dims must be positive, got K={k}, N={n}")
    if block_size <= 0:
        raise SfcError(f"block_size must be positive, not {block_size}")
    expected = (-(-k // block_size), n)
    if tuple(np.shape(scales)) != expected:
        raise SfcError(f"scales have shape {tuple(np.shape(scales))}, expected {expected} "
                       f"for K={k}, N={n}, block_size={block_size}")
    if np.asarray(packed_w).ndim != 1:
        raise SfcError(f"packed weights must be 1-D bytes, not shape {np.shape(packed_w)}")


def dequantize_blockwise(packed_w: np.ndarray, scales: np.ndarray, k: int, n: int,
                         block_size: int, bits: int) -> np.ndarray:
    """The float64 [K, N] weight that DequantizeLinear(axis=0, block_size) gives."""
    _check_weight(packed_w, scales, k, n, block_size)
    q = unpack(np.asarray(packed_w), (k, n), bits)
    full = np.repeat(np.asarray(scales, dtype=np.float64), block_size, axis=0)[:k]
    return q.astype(np.float64) * full


def _weight_only_gemm(x: np.ndarray, packed_w: np.ndarray, scales: np.ndarray, k: int,
                      n: int, block_size: int, bits: int) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != k:
        raise SfcError(f"activations must be [M, {k}], not {list(x.shape)}")
    if x.dtype not in (np.float16, np.float32, np.float64):
        raise SfcError(f"activations must be float16, float32 or float64, not {x.dtype}")
    w = dequantize_blockwise(packed_w, scales, k, n, block_size, bits)
    return (x.astype(np.float64) @ w).astype(np.float32)


def w4a16_gemm(x: np.ndarray, packed_w: np.ndarray, scales: np.ndarray, K: int, N: int,
               block_size: int) -> np.ndarray:
    """x [M, K] @ dequantized INT4 weight [K, N] -> float32 [M, N] (float64 inside)."""
    return _weight_only_gemm(x, packed_w, scales, K, N, block_size, 4)


def w2a16_gemm(x: np.ndarray, packed_w: np.ndarray, scales: np.ndarray, K: int, N: int,
               block_size: int) -> np.ndarray:
    """x [M, K] @ dequantized INT2 weight [K, N] -> float32 [M, N] (float64 inside)."""
    return _weight_only_gemm(x, packed_w, scales, K, N, block_size, 2)


def int_gemm_int32(xq: np.ndarray, wq: np.ndarray) -> np.ndarray:
    """The exact int32 accumulator of int8 [M, K] @ int8 [K, N].

    Computed in int64; an accumulator outside int32 raises (K > 131072 could overflow,
    which int32-accumulating kernels would silently wrap).
    """
    xq, wq = np.asarray(xq), np.asarray(wq)
    if xq.dtype != np.int8 or wq.dtype != np.int8:
        raise SfcError(f"int GEMM needs int8 operands, not {xq.dtype} and {wq.dtype}")
    if xq.ndim != 2 or wq.ndim != 2 or xq.shape[1] != wq.shape[0]:
        raise SfcError(f"cannot multiply {list(xq.shape)} by {list(wq.shape)}")
    acc = xq.astype(np.int64) @ wq.astype(np.int64)
    info = np.iinfo(np.int32)
    if acc.size and (acc.min() < info.min or acc.max() > info.max):
        raise SfcError("int8 GEMM accumulator overflows int32")
    return acc.astype(np.int32)


def w8a8_gemm(xq: np.ndarray, wq: np.ndarray, x_scale: float,
              w_scales: np.ndarray) -> np.ndarray:
    """(xq @ wq) * x_scale * w_scales[n] as float32; exact integer accumulation.

    `xq` int8 [M, K], `wq` int8 [K, N], `x_scale` the activation's per-tensor scale,
    `w_scales` [N] the weight's per-output-channel scales.
    """
    acc = int_gemm_int32(xq, wq)
    w_scales = np.asarray(w_scales, dtype=np.float64)
    if w_scales.shape != (acc.shape[1],):
        raise SfcError(f"w_scales must have shape ({acc.shape[1]},), not {w_scales.shape}")
    return (acc.astype(np.float64) * float(x_scale) * w_scales[None, :]).astype(np.float32)
