"""Weight scales and round-to-nearest weight quantization (numpy, deterministic).

Scales have the layout ONNX DequantizeLinear expects: a scalar (per-tensor), shape [C]
(per-channel on `axis`), or the weight's shape with the blocked axis replaced by
ceil(K / block_size) (block-wise). Integers are stored as int8 holding values inside the
spec's range; `sfc.kernels.packing` packs INT4 / INT2 (the ONNX layout the kernels read)
when the QDQ writer stores the tensor.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, get_args

import numpy as np

from ..errors import SfcError
from .spec import QuantSpec

__all__ = [
    "METHODS",
    "Method",
    "broadcast_scales",
    "default_method",
    "dequantize_weight",
    "limit_pairs",
    "pairs_over",
    "quantize_weight",
    "round_to_nearest",
    "scale_shape",
    "weight_scales",
]

Method = Literal["absmax", "mse"]
METHODS: tuple[str, ...] = get_args(Method)

# Clip ratios the MSE search tries, largest first so ties keep the wider range.
_MSE_RATIOS = tuple(r / 100 for r in range(100, 49, -1))
_CHUNK_ELEMENTS = 1 << 22  # bounds the search's temporaries to a few times 16 MB


def default_method(spec: QuantSpec) -> Method:
    """absmax for 8 bit (its rounding error is already small); mse for 4 and 2 bit."""
    return "absmax" if spec.bits == 8 else "mse"


def _check(w: np.ndarray, spec: QuantSpec) -> None:
    if spec.axis is not None and spec.axis >= w.ndim:
        raise SfcError(f"quantizer axis {spec.axis} is out of range for a rank-{w.ndim} weight")
    if w.size == 0:
        raise SfcError("cannot quantize an empty weight")
    if not np.isfinite(w).all():
        raise SfcError("weight has NaN or Inf values")


def scale_shape(shape: tuple[int, ...], spec: QuantSpec) -> tuple[int, ...]:
    """The shape of the DequantizeLinear scale for a weight of `shape`."""
    if spec.granularity == "tensor":
        return ()
    assert spec.axis is not None
    if spec.granularity == "channel":
        return (shape[spec.axis],)
    assert spec.block_size is not None
    blocks = -(-shape[spec.axis] // spec.block_size)
    return (*shape[: spec.axis], blocks, *shape[spec.axis + 1 :])


def _groups(w: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Rows that share one scale, as a 2-D float32 array [n_scales, group_len].

    Row order is the C order of `scale_shape`, so `rows.reshape(scale_shape)` maps back.
    Blocks past the end of the blocked axis are padded with zeros, which never change
    an absmax and always quantize exactly.
    """
    w = np.asarray(w, dtype=np.float32)
    if spec.granularity == "tensor":
        return w.reshape(1, -1)
    assert spec.axis is not None
    axis = spec.axis
    if spec.granularity == "channel":
        return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    assert spec.block_size is not None
    bs = spec.block_size
    k = w.shape[axis]
    blocks = -(-k // bs)
    if blocks * bs != k:
        pad = [(0, 0)] * w.ndim
        pad[axis] = (0, blocks * bs - k)
        w = np.pad(w, pad)
    # [.., blocks*bs, ..] -> [.., blocks, bs, ..] -> bs last -> rows in scale_shape order
    split = w.reshape((*w.shape[:axis], blocks, bs, *w.shape[axis + 1 :]))
    return np.moveaxis(split, axis + 1, -1).reshape(-1, bs)


def _chunks(rows: np.ndarray) -> Iterator[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        yield slice(start, start + step)


def _sq_error(rows: np.ndarray, scale: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Per-row squared error of round-to-nearest at `scale` (float32, as stored)."""
    s = scale[:, None]
    q = np.clip(np.rint(rows / s), spec.qmin, spec.qmax)
    diff = (q * s - rows).astype(np.float64)
    return np.einsum("ij,ij->i", diff, diff)


def weight_scales(w: np.ndarray, spec: QuantSpec, method: str | None = None) -> np.ndarray:
    """float32 scales for `w` under `spec`.

    absmax: |w|max / qmax per group (every value in range; error <= scale / 2); with a
    `pair_limit`, the largest K-adjacent |a| + |b| / (limit - 1) instead, which keeps the
    pairs inside the limit without clipping (a finer step than 7-bit weights' |w|max / 63).
    mse: per group, the scale (|w|max * r / qmax for r in 1.00, 0.99, ..., 0.50) with
    the least squared round-to-nearest error; clipping a few outliers buys resolution
    for the rest, which matters at 4 and 2 bits. Deterministic and vectorised.
    """
    method = method or default_method(spec)
    if method not in METHODS:
        raise SfcError(f"unknown weight scale method {method!r} (choose from {', '.join(METHODS)})")
    w = np.asarray(w)
    _check(w, spec)
    rows = _groups(w, spec)
    top, steps = np.abs(rows).max(axis=1), np.float32(spec.qmax)
    if spec.pair_limit is not None:
        # Room for every K-adjacent pair: |a| + |b| <= (limit - 1) steps, so the two
        # roundings (half a step each) keep |q_a| + |q_b| <= limit; no value is clipped.
        a, b = _pair_columns(rows)
        top = np.maximum(top, (np.abs(a) + np.abs(b)).max(axis=1, initial=0.0))
        steps = np.float32(min(spec.qmax, spec.pair_limit - 1))
    # An all-zero group quantizes exactly at any scale; 1.0 keeps scales strictly positive.
    safe = np.where(top > 0, top, steps).astype(np.float32)
    scales = (safe / steps).astype(np.float32)
    if method == "mse":
        for part in _chunks(rows):
            block, base = rows[part], safe[part]
            best_scale = scales[part].copy()
            best_err = _sq_error(block, best_scale, spec)
            for ratio in _MSE_RATIOS[1:]:
                cand = (base * np.float32(ratio) / steps).astype(np.float32)
                err = _sq_error(block, cand, spec)
                better = err < best_err  # strict: ties keep the larger ratio
                best_err = np.where(better, err, best_err)
                best_scale = np.where(better, cand, best_scale)
            scales[part] = best_scale
    return scales.reshape(scale_shape(w.shape, spec))


def broadcast_scales(scales: np.ndarray, spec: QuantSpec, shape: tuple[int, ...]) -> np.ndarray:
    """`scales` expanded to a weight of `shape` (one scale per element)."""
    scales = np.asarray(scales, dtype=np.float32)
    expected = scale_shape(shape, spec)
    if scales.shape != expected:
        what = f"scales have shape {scales.shape}"
        raise SfcError(f"{what}, expected {expected} for {spec.describe()}")
    if spec.granularity == "tensor":
        return np.broadcast_to(scales, shape)
    assert spec.axis is not None
    if spec.granularity == "channel":
        view = [1] * len(shape)
        view[spec.axis] = shape[spec.axis]
        return np.broadcast_to(scales.reshape(view), shape)
    assert spec.block_size is not None
    full = np.repeat(scales, spec.block_size, axis=spec.axis)
    return np.take(full, np.arange(shape[spec.axis]), axis=spec.axis)


def _pair_columns(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Views of the even-K and odd-K columns of rows [channels, K] (an odd K's last element
    pairs with padding, so it is left out)."""
    even = rows.shape[1] - rows.shape[1] % 2
    return rows[:, 0:even:2], rows[:, 1:even:2]


def _pairs(q: np.ndarray, channel_axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows [channels, K] as a new int32 array, its even-K and odd-K columns as views)."""
    rows = np.moveaxis(np.asarray(q, dtype=np.int32), channel_axis, 0)
    rows = rows.reshape(rows.shape[0], -1).copy()
    return (rows, *_pair_columns(rows))


def pairs_over(q: np.ndarray, channel_axis: int, limit: int) -> int:
    """How many K-adjacent pairs (2k, 2k+1) of integer weights `q` have |a| + |b| > limit.

    K is the weight flattened along every axis but `channel_axis` (the GEMM reduction).
    """
    _, a, b = _pairs(q, channel_axis)
    return int((np.abs(a) + np.abs(b) > limit).sum())


def limit_pairs(q: np.ndarray, channel_axis: int, limit: int) -> np.ndarray:
    """`q` with every K-adjacent pair brought to |a| + |b| <= limit (see `pairs_over`).

    `weight_scales` already leaves room for the pairs, so this changes nothing there; it
    guards scales from elsewhere (MSE candidates, replayed recipes). The excess is split
    between the two (the larger magnitude gives the odd unit), which keeps the added squared
    error smallest; no sign flips since each |q| <= 128.
    """
    rows, a, b = _pairs(q, channel_axis)
    over = np.maximum(np.abs(a) + np.abs(b) - limit, 0)
    a_larger = np.abs(a) >= np.abs(b)
    big, small = (over + 1) // 2, over // 2
    a -= np.sign(a) * np.where(a_larger, big, small)  # views: writes reach `rows`
    b -= np.sign(b) * np.where(a_larger, small, big)
    moved = np.moveaxis(np.asarray(q), channel_axis, 0).shape
    return np.moveaxis(rows.reshape(moved), 0, channel_axis).astype(np.asarray(q).dtype)


def quantize_weight(w: np.ndarray, spec: QuantSpec, scales: np.ndarray) -> np.ndarray:
    """Round half to even of w / scale, clipped to the spec's range (and its pair limit),
    as int8."""
    w = np.asarray(w, dtype=np.float32)
    _check(w, spec)
    s = broadcast_scales(scales, spec, w.shape)
    if not (np.isfinite(s).all() and (s > 0).all()):
        raise SfcError("weight scales must be finite and > 0")
    q = np.clip(np.rint(w / s), spec.qmin, spec.qmax).astype(np.int8)
    if spec.pair_limit is not None:
        assert spec.axis is not None  # pair limits are per-channel (QuantSpec checks)
        q = limit_pairs(q, spec.axis, spec.pair_limit)
    return q


def round_to_nearest(w: np.ndarray, spec: QuantSpec, method: str | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(integers, scales) of `w` rounded to nearest at `weight_scales(w, spec, method)`."""
    scales = weight_scales(w, spec, method)
    return quantize_weight(w, spec, scales), scales


def dequantize_weight(q: np.ndarray, spec: QuantSpec, scales: np.ndarray) -> np.ndarray:
    """q * scale as float32 (what DequantizeLinear computes)."""
    q = np.asarray(q)
    return (q.astype(np.float32) * broadcast_scales(scales, spec, q.shape)).astype(np.float32)
