"""Triton GEMM kernels for sfc's quantized layers, and their launchers (torch tensors).

- ``w4a16_gemm`` / ``w2a16_gemm``: fp16 activations [M, K] times a block-quantized INT4 /
  INT2 weight [K, N] stored exactly as sfc's QDQ writer stores it (``sfc.kernels.packing``:
  the row-major [K, N] tensor flattened and packed, 4-bit low nibble first, 2-bit
  ``x0 | x1<<2 | x2<<4 | x3<<6``) with scales [ceil(K / block_size), N] (fp16 or fp32).
  fp32 accumulation, fp16 output. fp32 activations are also taken (for a graph that runs
  in fp32, e.g. the TensorRT plugin node): they are rounded to fp16 as they are loaded
  (values beyond fp16's range become inf) and the output is fp32.
- ``w8a8_gemm``: int8 [M, K] x int8 [K, N] with an int32 accumulator (``tl.dot``, int32
  out), then ``acc * x_scale * w_scales[n]`` in fp32, written as fp16 or fp32;
  ``int8_gemm_int32`` writes the raw int32 accumulator (for exactness checks).

How the weight-only kernels compute: each K tile lies inside one scale block (BLOCK_K
divides block_size; sfc's block sizes are powers of two >= 16); its integers are scaled by
the block's scale in fp32 and rounded to fp16, as a DQ node in fp16 would, then
``acc = dot(x, w, acc)`` accumulates in fp32. When N is a multiple of the fields per byte
(every Whisper layer) each row starts on a byte: the tile's bytes are loaded once, in
contiguous runs, and their fields interleaved back into column order (``tl.join``).
Otherwise each element reads its byte by flat index ``k * N + n`` (byte ``idx // per_byte``,
field ``idx % per_byte``), so any N works, rows that start mid-byte included. On an H200
(BENCHMARKS.md) that flat gather was what made the first version 3 to 17x slower than
cuBLAS fp16 at M = 1500; whole-byte loads made it 3 to 9x faster.

Decode shapes have too few output tiles to fill a GPU (tiny.en's fc2 at M = 1: 6 tiles of
64 columns), so the launchers split K (``split_k_for``): SPLIT_K programs per output tile
each sum every SPLIT_K-th K tile into their own slice of an fp32 buffer, and a second kernel
adds the slices in a fixed order (deterministic, no atomics). Tiles and splits are fixed per
call, not autotuned; the TensorRT plugin (``sfc.kernels.aot``) compiles SPLIT_K = 1.

Parameters are ordered inputs, scalars, outputs: the order TensorRT's AOT plugins launch
with (``tensorrt.plugin.aot_impl``: extra scalar args sit after the tensor inputs and before
the outputs), so ``sfc.kernels.aot`` compiles these same kernels.

Masks cover M, N and K that are not multiples of the tiles and K that is not a multiple
of block_size. Decode shapes (M <= 16) use BLOCK_M = 16, the smallest ``tl.dot`` takes.

Importing this module imports triton (``sfc.kernels`` itself does not). Set
``TRITON_INTERPRET=1`` before the import to run the kernels on the CPU (tests do).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ..errors import SfcError
from .packing import packed_size

__all__ = [
    "int8_gemm_int32",
    "split_k_for",
    "tiles_for",
    "w2a16_gemm",
    "w4a16_gemm",
    "w8a8_gemm",
]

_INT32_ELEMENTS = 2**31  # flat weight indices are int32 in the kernels


@triton.jit
def _output_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row and column offsets of this program's output tile, and their in-bounds masks."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def _unpack_rows(w_ptr, offs_k, mask_k, N, BITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's [BLOCK_K, BLOCK_N] signed integers, rows that start on a byte (N a
    multiple of the fields per byte): each byte loaded once, in contiguous runs (vector
    loads), its fields split apart and interleaved back into column order with tl.join."""
    PER_BYTE: tl.constexpr = 8 // BITS
    FIELD: tl.constexpr = (1 << BITS) - 1
    SIGN: tl.constexpr = 1 << (BITS - 1)
    BLOCK_B: tl.constexpr = BLOCK_N // PER_BYTE
    row_bytes = N // PER_BYTE
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    byte = tl.load(w_ptr + offs_k[:, None] * row_bytes + offs_b[None, :],
                   mask=mask_k[:, None] & (offs_b < row_bytes)[None, :], other=0).to(tl.int32)
    f0 = ((byte & FIELD) ^ SIGN) - SIGN  # sign-extend each two's complement field
    f1 = (((byte >> BITS) & FIELD) ^ SIGN) - SIGN
    if BITS == 4:
        q = tl.join(f0, f1)  # [.., j, i] = field i of byte j = column PER_BYTE * j + i
    else:
        f2 = (((byte >> 4) & FIELD) ^ SIGN) - SIGN
        f3 = (((byte >> 6) & FIELD) ^ SIGN) - SIGN
        q = tl.join(tl.join(f0, f2), tl.join(f1, f3))  # [.., j, a, b] = field 2a + b
    return tl.reshape(q, (offs_k.shape[0], BLOCK_N))


@triton.jit
def _gather_fields(w_ptr, offs_k, mask_k, offs_n, mask_n, N, BITS: tl.constexpr):
    """The same integers for any N (rows may start mid-byte): each element reads its byte
    by flat index k * N + n. Several times slower on a GPU (scattered byte loads)."""
    PER_BYTE: tl.constexpr = 8 // BITS
    FIELD: tl.constexpr = (1 << BITS) - 1
    SIGN: tl.constexpr = 1 << (BITS - 1)
    flat = offs_k[:, None] * N + offs_n[None, :]
    byte = tl.load(w_ptr + flat // PER_BYTE, mask=mask_k[:, None] & mask_n[None, :],
                   other=0).to(tl.int32)
    field = (byte >> ((flat % PER_BYTE) * BITS)) & FIELD
    return (field ^ SIGN) - SIGN


@triton.jit
def lowbit_a16_kernel(
    x_ptr, w_ptr, s_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_sk, stride_sn, stride_ym, stride_yn,
    y_ptr,
    BITS: tl.constexpr, QBLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr = 1, ALIGNED: tl.constexpr = False,
):  # fmt: skip
    """y[M, N] = x[M, K] @ (q * s), q packed BITS-bit, s per QBLOCK rows; y has y_ptr's type.

    ALIGNED: N is a multiple of the fields per byte (every Whisper layer), so whole bytes
    are loaded. SPLIT_K > 1: program (.., .., j) sums K tiles j, j + SPLIT_K, ... and writes
    its partial sum to slice j of a contiguous [SPLIT_K, M, N] buffer
    (``_split_k_sum_kernel`` adds them).
    """
    offs_m, offs_n, mask_m, mask_n = _output_tile(M, N, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(tl.program_id(2) * BLOCK_K, K, SPLIT_K * BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float16)
        if ALIGNED:
            q = _unpack_rows(w_ptr, offs_k, mask_k, N, BITS, BLOCK_N)
        else:
            q = _gather_fields(w_ptr, offs_k, mask_k, offs_n, mask_n, N, BITS)
        # The K tile lies inside one scale block (BLOCK_K divides QBLOCK): one scale row.
        s = tl.load(s_ptr + (k0 // QBLOCK) * stride_sk + offs_n * stride_sn, mask=mask_n,
                    other=0.0).to(tl.float32)
        # Dequantized before the dot (fp32 product, rounded to fp16 as a DQ in fp16 would),
        # so the dot accumulates in place (the tensor cores' chained accumulator).
        w = (q.to(tl.float32) * s[None, :]).to(tl.float16)
        # Masked elements are 0 in x and w, so they add nothing to the dot.
        acc = tl.dot(x, w, acc, out_dtype=tl.float32)
    if SPLIT_K > 1:
        y_ptr += tl.program_id(2) * M * stride_ym
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _split_k_sum_kernel(part_ptr, M, N, stride_ym, stride_yn, y_ptr, SPLIT_K: tl.constexpr,
                        BLOCK: tl.constexpr):
    """y = sum over j of part[j] ([SPLIT_K, M, N] fp32, contiguous), in a fixed order."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in range(SPLIT_K):
        total += tl.load(part_ptr + j * M * N + offs, mask=mask, other=0.0)
    tl.store(y_ptr + (offs // N) * stride_ym + (offs % N) * stride_yn,
             total.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def int8_gemm_kernel(
    x_ptr, w_ptr, ws_ptr,
    x_scale, M, N, K,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_ym, stride_yn,
    y_ptr,
    SCALED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """int8 x int8 -> int32 accumulator; SCALED: y = acc * x_scale * ws[n], else y = acc."""
    offs_m, offs_n, mask_m, mask_n = _output_tile(M, N, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0)
        b = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    y_mask = mask_m[:, None] & mask_n[None, :]
    if SCALED:
        ws = tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        y = acc.to(tl.float32) * x_scale * ws[None, :]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        tl.store(y_ptrs, acc, mask=y_mask)


def tiles_for(m: int, block_size: int | None = None) -> tuple[int, int, int]:
    """Default (BLOCK_M, BLOCK_N, BLOCK_K) for `m` rows.

    Decode (m <= 16): BLOCK_M = 16, the smallest tl.dot tile, masked down to m; else
    128 x 64, the most frequent best of the weight-only kernels at M = 1500 on an H200
    (BENCHMARKS.md). Weight-only kernels need BLOCK_K to divide `block_size` (one scale
    row per K tile).
    """
    block_k = 64 if block_size is None else min(64, block_size)
    return (16, 32, block_k) if m <= 16 else (128, 64, block_k)


SPLIT_K_PROGRAMS = 128  # about one program per SM on the GPUs sfc targets (H100/H200: 132)


def split_k_for(m: int, n: int, k: int, tiles: tuple[int, int, int]) -> int:
    """How many ways the weight-only kernels split K: 1 unless the output tiles alone leave
    most of a GPU idle (decode), then enough to make about SPLIT_K_PROGRAMS programs, never
    more than there are K tiles."""
    block_m, block_n, block_k = tiles
    programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    return max(1, min(triton.cdiv(k, block_k), SPLIT_K_PROGRAMS // programs))


def _check_tiles(block_m: int, block_n: int, block_k: int) -> None:
    for name, v in (("BLOCK_M", block_m), ("BLOCK_N", block_n), ("BLOCK_K", block_k)):
        if v < 16 or v & (v - 1):
            raise SfcError(f"{name} must be a power of two >= 16 (tl.dot), not {v}")


def _same_device(*tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise SfcError(f"tensors are on different devices: {sorted(map(str, devices))}")


def _output(out: torch.Tensor | None, shape: tuple[int, int], dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device:
        raise SfcError(f"out must be {dtype} {list(shape)} on {device}, got {out.dtype} "
                       f"{list(out.shape)} on {out.device}")
    return out


def _lowbit_gemm(x: torch.Tensor, packed_w: torch.Tensor, scales: torch.Tensor, k: int,
                 n: int, block_size: int, bits: int, out: torch.Tensor | None,
                 tiles: tuple[int, int, int] | None, split_k: int | None,
                 num_warps: int) -> torch.Tensor:
    name = f"W{bits}A16"
    if x.dtype not in (torch.float16, torch.float32) or x.dim() != 2 or x.shape[1] != k:
        raise SfcError(f"{name}: activations must be float16/float32 [M, {k}], got {x.dtype} "
                       f"{list(x.shape)}")
    if block_size < 16 or block_size & (block_size - 1):
        raise SfcError(f"{name}: block_size must be a power of two >= 16, not {block_size}")
    if n <= 0 or k <= 0 or k * n >= _INT32_ELEMENTS:
        raise SfcError(f"{name}: need 0 < K * N < 2**31, got K={k}, N={n}")
    if packed_w.dtype != torch.uint8 or packed_w.dim() != 1 or not packed_w.is_contiguous():
        raise SfcError(f"{name}: packed weights must be contiguous 1-D uint8, got "
                       f"{packed_w.dtype} {list(packed_w.shape)}")
    if packed_w.numel() != packed_size(k * n, bits):
        raise SfcError(f"{name}: {packed_w.numel()} packed bytes, expected "
                       f"{packed_size(k * n, bits)} for K={k}, N={n}")
    blocks = -(-k // block_size)
    if tuple(scales.shape) != (blocks, n) or scales.dtype not in (torch.float16, torch.float32):
        raise SfcError(f"{name}: scales must be float16/float32 [{blocks}, {n}], got "
                       f"{scales.dtype} {list(scales.shape)}")
    _same_device(x, packed_w, scales)
    m = x.shape[0]
    block_m, block_n, block_k = tiles = tiles or tiles_for(m, block_size)
    _check_tiles(block_m, block_n, block_k)
    if block_size % block_k:
        raise SfcError(f"{name}: BLOCK_K {block_k} must divide block_size {block_size}")
    split = split_k_for(m, n, k, tiles) if split_k is None else split_k
    if split < 1:
        raise SfcError(f"{name}: split_k must be >= 1, not {split}")
    y = _output(out, (m, n), x.dtype, x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split)
    # Split K: fp32 partial sums in a contiguous [split, M, N] buffer, then one fixed-order sum.
    dest = y if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    lowbit_a16_kernel[grid](
        x, packed_w, scales, m, n, k,
        x.stride(0), x.stride(1), scales.stride(0), scales.stride(1),
        dest.stride(-2), dest.stride(-1),
        dest, BITS=bits, QBLOCK=block_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        SPLIT_K=split, ALIGNED=n % (8 // bits) == 0, num_warps=num_warps,
    )  # fmt: skip
    if split > 1:
        block = 1024
        _split_k_sum_kernel[(triton.cdiv(m * n, block),)](
            dest, m, n, y.stride(0), y.stride(1), y, SPLIT_K=split, BLOCK=block)
    return y


def w4a16_gemm(x: torch.Tensor, packed_w: torch.Tensor, scales: torch.Tensor, K: int,
               N: int, block_size: int, *, out: torch.Tensor | None = None,
               tiles: tuple[int, int, int] | None = None, split_k: int | None = None,
               num_warps: int = 4) -> torch.Tensor:
    """fp16 x [M, K] @ INT4 block weight [K, N] -> fp16 [M, N] (fp32 accumulation).

    `packed_w`: uint8 ONNX INT4 raw data of the row-major [K, N] integers; `scales`:
    [ceil(K / block_size), N] fp16/fp32. fp32 `x` is rounded to fp16 on load and gives an
    fp32 result. `out`: optional preallocated [M, N] of x's dtype.
    `tiles`: (BLOCK_M, BLOCK_N, BLOCK_K), default `tiles_for(M, block_size)`; `split_k`: how many
    ways K is split, default `split_k_for(M, N, K, tiles)`.
    """
    return _lowbit_gemm(x, packed_w, scales, K, N, block_size, 4, out, tiles, split_k,
                        num_warps)


def w2a16_gemm(x: torch.Tensor, packed_w: torch.Tensor, scales: torch.Tensor, K: int,
               N: int, block_size: int, *, out: torch.Tensor | None = None,
               tiles: tuple[int, int, int] | None = None, split_k: int | None = None,
               num_warps: int = 4) -> torch.Tensor:
    """fp16 x [M, K] @ INT2 block weight [K, N] -> fp16 [M, N]; arguments as `w4a16_gemm`."""
    return _lowbit_gemm(x, packed_w, scales, K, N, block_size, 2, out, tiles, split_k,
                        num_warps)


def _int8_gemm(xq: torch.Tensor, wq: torch.Tensor, x_scale: float,
               w_scales: torch.Tensor | None, out_dtype: torch.dtype, out: torch.Tensor | None,
               tiles: tuple[int, int, int] | None, num_warps: int) -> torch.Tensor:
    if xq.dtype != torch.int8 or wq.dtype != torch.int8 or xq.dim() != 2 or wq.dim() != 2:
        raise SfcError(f"W8A8: operands must be 2-D int8, got {xq.dtype} {list(xq.shape)} and "
                       f"{wq.dtype} {list(wq.shape)}")
    m, k = xq.shape
    k2, n = wq.shape
    if k != k2:
        raise SfcError(f"W8A8: cannot multiply {list(xq.shape)} by {list(wq.shape)}")
    scaled = w_scales is not None
    if w_scales is not None:
        if tuple(w_scales.shape) != (n,) or not w_scales.is_floating_point():
            raise SfcError(f"W8A8: w_scales must be float [{n}], got {w_scales.dtype} "
                           f"{list(w_scales.shape)}")
        _same_device(xq, wq, w_scales)
    _same_device(xq, wq)
    block_m, block_n, block_k = tiles or tiles_for(m)
    _check_tiles(block_m, block_n, block_k)
    y = _output(out, (m, n), out_dtype, xq.device)
    # Unscaled, the scale pointer is never read; passing y keeps the signature fixed.
    ws: Any = w_scales if w_scales is not None else y
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    int8_gemm_kernel[grid](
        xq, wq, ws, float(x_scale), m, n, k,
        xq.stride(0), xq.stride(1), wq.stride(0), wq.stride(1), y.stride(0), y.stride(1),
        y, SCALED=scaled, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
    )  # fmt: skip
    return y


def w8a8_gemm(xq: torch.Tensor, wq: torch.Tensor, x_scale: float, w_scales: torch.Tensor, *,
              out_dtype: torch.dtype = torch.float16, out: torch.Tensor | None = None,
              tiles: tuple[int, int, int] | None = None, num_warps: int = 4) -> torch.Tensor:
    """(int8 xq [M, K] @ int8 wq [K, N]) * x_scale * w_scales[n] -> `out_dtype` [M, N].

    The accumulator is int32 (exact); the scaling is fp32. `out_dtype`: fp16 or fp32.
    """
    if out_dtype not in (torch.float16, torch.float32):
        raise SfcError(f"W8A8: out_dtype must be float16 or float32, not {out_dtype}")
    return _int8_gemm(xq, wq, x_scale, w_scales, out_dtype, out, tiles, num_warps)


def int8_gemm_int32(xq: torch.Tensor, wq: torch.Tensor, *, out: torch.Tensor | None = None,
                    tiles: tuple[int, int, int] | None = None,
                    num_warps: int = 4) -> torch.Tensor:
    """The raw int32 accumulator of int8 xq [M, K] @ int8 wq [K, N] (wraps past int32)."""
    return _int8_gemm(xq, wq, 1.0, None, torch.int32, out, tiles, num_warps)
