"""Weight scales and round-to-nearest weight quantization (numpy, deterministic).

Scales have the layout ONNX DequantizeLinear expects: a scalar (per-tensor), shape [C]
(per-channel on `axis`), or the weight's shape with the blocked axis replaced by
ceil(K / block_size) (block-wise). Integers are stored as int8 holding values inside the
spec's range; `sfc.kernels.packing` packs INT4 / INT2 (the ONNX layout the kernels read)
when the QDQ writer stores the tensor.

Zero-point block specs (`QuantSpec.zero_point`) carry d = q - z instead: each block rounds
into its own window [lo, lo + span] of integers, centred on the block's mid-range and
always holding 0 (`integer_bounds`), and the writer splits d into q and z
(`split_zero_points`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Literal, get_args

import numpy as np

from ..errors import SfcError
from .spec import QuantSpec

__all__ = [
    "METHODS",
    "Method",
    "Rounded",
    "broadcast_scales",
    "check_integers",
    "default_method",
    "dequantize_weight",
    "integer_bounds",
    "limit_pairs",
    "pairs_over",
    "quantize_weight",
    "round_clip",
    "round_to_nearest",
    "scale_shape",
    "split_zero_points",
    "stored_scales",
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


def _with_zero(low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A group's value range widened to hold 0 (zero-point windows always hold it)."""
    zero = np.float32(0)
    return (np.minimum(low, zero).astype(np.float32), np.maximum(high, zero).astype(np.float32))


def _window(low: np.ndarray, high: np.ndarray, scale: np.ndarray, spec: QuantSpec
            ) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) integer bounds per group of a spec, from each group's min / max value and
    scale: the spec's range, or for zero points the window of `span` + 1 integers centred
    on the mid-range of the group's values and 0 (lo in [-span, 0], so 0 is in it)."""
    if not spec.zero_point:
        lo = np.full(np.shape(scale), spec.qmin, dtype=np.float32)
        return lo, lo + np.float32(spec.span)
    half = np.float32(spec.span / 2)
    low, high = _with_zero(low, high)
    mid = (low + high) / (np.float32(2) * scale)
    lo = np.clip(np.rint(mid - half), -spec.span, 0).astype(np.float32)
    return lo, lo + np.float32(spec.span)


# float16's smallest subnormal and largest finite value: a float16 scale stays > 0 and finite.
_HALF_TINY, _HALF_MAX = np.float32(2.0 ** -24), np.float32(65504.0)
_CODES = 255  # the largest 8-bit scale code


def _half(scales: np.ndarray) -> np.ndarray:
    """The nearest float16 values, inside float16's positive finite range, as float32."""
    return np.clip(scales, _HALF_TINY, _HALF_MAX).astype(np.float16).astype(np.float32)


def stored_scales(scales: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """`scales` (DequantizeLinear layout) as the spec stores them, as float32: unchanged at
    32 bits; at 16, the nearest float16 values; at 8, per column (each index of the axes but
    the blocked one) a float16 step near the column's largest scale / 255 and each scale the
    nearest code in 1..255 times it, the largest code 255 (exact in float32: 8 + 11
    significant bits). Idempotent. So every rounding decision is made with the scale the
    deployed file holds."""
    scales = np.asarray(scales, dtype=np.float32)
    if spec.scale_bits == 32:
        return scales
    if spec.scale_bits == 16:
        return _half(scales)
    assert spec.axis is not None  # 8-bit codes are for block specs (QuantSpec checks)
    top = scales.max(axis=spec.axis, keepdims=True)
    step = _half(top / np.float32(_CODES))
    codes = np.clip(np.rint(scales / step), 1, _CODES)
    # Each column's largest scale takes code 255 (a change of at most float16's rounding
    # of the step), so the step is its largest value / 255: storing it again changes
    # nothing, and the lowering reads the step back from the values.
    codes = np.where(scales == top, _CODES, codes).astype(np.float32)
    return codes * step


def round_clip(x: np.ndarray, lo: np.ndarray | float, hi: np.ndarray | float) -> np.ndarray:
    """Round half to even, then clip to [lo, hi]: the one rounding every quantizer uses."""
    return np.clip(np.rint(x), lo, hi)


def _sq_error(rows: np.ndarray, scale: np.ndarray, spec: QuantSpec,
              low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Per-row squared error of round-to-nearest at `scale` (float32, as stored); `low`,
    `high`: each row's min and max."""
    s = scale[:, None]
    lo, hi = _window(low, high, scale, spec)
    q = round_clip(rows / s, lo[:, None], hi[:, None])
    diff = q * s - rows
    return np.einsum("ij,ij->i", diff, diff, dtype=np.float64)


def weight_scales(w: np.ndarray, spec: QuantSpec, method: str | None = None) -> np.ndarray:
    """float32 scales for `w` under `spec`.

    absmax: |w|max / qmax per group (every value in range; error <= scale / 2); with a
    `pair_limit`, the largest K-adjacent |a| + |b| / (limit - 1) instead, which keeps the
    pairs inside the limit without clipping (a finer step than 7-bit weights' |w|max / 63).
    mse: per group, the scale (|w|max * r / qmax for r in 1.00, 0.99, ..., 0.50) with
    the least squared round-to-nearest error; clipping a few outliers buys resolution
    for the rest, which matters at 4 and 2 bits. Deterministic and vectorised.
    Zero-point specs size the step for the group's range instead: (max - min) / span.
    Every candidate is the scale as stored (`stored_scales`; 8-bit codes depend on the
    whole column, so candidates are float16 values and the chosen scales are coded last).
    """
    method = method or default_method(spec)
    if method not in METHODS:
        raise SfcError(f"unknown weight scale method {method!r} (choose from {', '.join(METHODS)})")
    w = np.asarray(w)
    _check(w, spec)
    rows = _groups(w, spec)
    top, steps = np.abs(rows).max(axis=1), np.float32(spec.qmax)
    if spec.zero_point:
        low, high = _with_zero(rows.min(axis=1), rows.max(axis=1))
        spread = high - low
        # A constant group (spread 0) keeps |w|max / qmax, which holds it exactly.
        top = np.where(spread > 0, spread / np.float32(spec.span) * steps, top)
    if spec.pair_limit is not None:
        # Room for every K-adjacent pair: |a| + |b| <= (limit - 1) steps, so the two
        # roundings (half a step each) keep |q_a| + |q_b| <= limit; no value is clipped.
        a, b = _pair_columns(rows)
        top = np.maximum(top, (np.abs(a) + np.abs(b)).max(axis=1, initial=0.0))
        steps = np.float32(min(spec.qmax, spec.pair_limit - 1))
    # An all-zero group quantizes exactly at any scale; 1.0 keeps scales strictly positive.
    safe = np.where(top > 0, top, steps).astype(np.float32)
    row_spec = replace(spec, scale_bits=16) if spec.scale_bits == 8 else spec
    scales = stored_scales(safe / steps, row_spec)
    if method == "mse":
        for part in _chunks(rows):
            block, base = rows[part], safe[part]
            low, high = block.min(axis=1), block.max(axis=1)  # the same for every ratio
            best_scale = scales[part].copy()
            best_err = _sq_error(block, best_scale, spec, low, high)
            for ratio in _MSE_RATIOS[1:]:
                cand = stored_scales(base * np.float32(ratio) / steps, row_spec)
                err = _sq_error(block, cand, spec, low, high)
                better = err < best_err  # strict: ties keep the larger ratio
                best_err = np.where(better, err, best_err)
                best_scale = np.where(better, cand, best_scale)
            scales[part] = best_scale
    return stored_scales(scales.reshape(scale_shape(w.shape, spec)), spec)


def _checked_scales(scales: np.ndarray, spec: QuantSpec, shape: tuple[int, ...]
                    ) -> np.ndarray:
    """`scales` as float32, with a one-line error unless they fit a weight of `shape`."""
    scales = np.asarray(scales, dtype=np.float32)
    expected = scale_shape(shape, spec)
    if scales.shape != expected:
        raise SfcError(f"scales have shape {scales.shape}, expected {expected} "
                       f"for {spec.describe()}")
    return scales


def broadcast_scales(scales: np.ndarray, spec: QuantSpec, shape: tuple[int, ...]) -> np.ndarray:
    """`scales` expanded to a weight of `shape` (one scale per element)."""
    scales = _checked_scales(scales, spec, shape)
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


def integer_bounds(w: np.ndarray, spec: QuantSpec, scales: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) float32 integer bounds of each group of `w` at `scales`, in the scales'
    layout: the spec's range, or each zero-point block's window (see the module doc)."""
    w = np.asarray(w, dtype=np.float32)
    scales = np.asarray(scales, dtype=np.float32)
    rows = _groups(w, spec)
    flat = scales.reshape(-1)
    if flat.shape[0] != rows.shape[0]:
        raise SfcError(f"scales have shape {scales.shape}, expected "
                       f"{scale_shape(w.shape, spec)} for {spec.describe()}")
    lo, hi = _window(rows.min(axis=1), rows.max(axis=1), flat, spec)
    return lo.reshape(scales.shape), hi.reshape(scales.shape)


def quantize_weight(w: np.ndarray, spec: QuantSpec, scales: np.ndarray) -> np.ndarray:
    """Round half to even of w / scale, clipped to the spec's range (each zero-point
    block's window; the pair limit), as int8."""
    w = np.asarray(w, dtype=np.float32)
    _check(w, spec)
    s = broadcast_scales(scales, spec, w.shape)
    if not (np.isfinite(s).all() and (s > 0).all()):
        raise SfcError("weight scales must be finite and > 0")
    lo, hi = integer_bounds(w, spec, scales)
    q = round_clip(w / s, broadcast_scales(lo, spec, w.shape),
                   broadcast_scales(hi, spec, w.shape)).astype(np.int8)
    if spec.pair_limit is not None:
        assert spec.axis is not None  # pair limits are per-channel (QuantSpec checks)
        q = limit_pairs(q, spec.axis, spec.pair_limit)
    return q


def round_to_nearest(w: np.ndarray, spec: QuantSpec, method: str | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(integers, scales) of `w` rounded to nearest at `weight_scales(w, spec, method)`."""
    scales = weight_scales(w, spec, method)
    return quantize_weight(w, spec, scales), scales


def check_integers(q: np.ndarray, spec: QuantSpec) -> str | None:
    """Why int8 integers `q` cannot be a weight's under `spec` (None: they can): outside
    the carried range, or a zero-point block whose integers lie more than `span` apart."""
    q = np.asarray(q)
    lo, hi = spec.int_bounds
    if q.dtype != np.int8 or q.min(initial=0) < lo or q.max(initial=0) > hi:
        return f"integers outside [{lo}, {hi}] (INT{spec.bits})"
    if spec.zero_point:
        rows = _groups(q.astype(np.float32), spec)
        if (rows.max(axis=1) - rows.min(axis=1) > spec.span).any():
            return f"a block's integers lie more than {spec.span} apart (no zero point fits)"
    return None


def split_zero_points(d: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """(stored integers q, zero points z in the scales' layout) with q - z = d, both in the
    spec's range; z is the one nearest 0 (0 wherever d already fits)."""
    d = np.asarray(d)
    reason = check_integers(d, spec)
    if reason is not None:
        raise SfcError(reason)
    rows = _groups(d.astype(np.float32), spec)
    z = np.clip(0, spec.qmin - rows.min(axis=1), spec.qmax - rows.max(axis=1))
    z = z.reshape(scale_shape(d.shape, spec))
    q = d.astype(np.int16) + broadcast_scales(z, spec, d.shape).astype(np.int16)
    return q.astype(np.int8), z.astype(np.int8)


def dequantize_weight(q: np.ndarray, spec: QuantSpec, scales: np.ndarray) -> np.ndarray:
    """q * scale as float32 (what DequantizeLinear computes).

    Scaled in place, block by block, so the only new array is the result: a block-scaled
    table expanded its scales to full size and copied the product, 3x the result at the
    peak (tiny.en's 80 MB table: 240 MB; the probes dequantize one per probe)."""
    q = np.asarray(q)
    out = q.astype(np.float32)
    if spec.granularity != "block":
        out *= broadcast_scales(scales, spec, q.shape)  # a view: nothing materialized
        return out
    scales = _checked_scales(scales, spec, q.shape)
    assert spec.axis is not None and spec.block_size is not None
    size, n = spec.block_size, q.shape[spec.axis]
    whole = n // size
    rows, per_block = np.moveaxis(out, spec.axis, -1), np.moveaxis(scales, spec.axis, -1)
    if whole:
        blocks = rows[..., : whole * size].reshape(*rows.shape[:-1], whole, size, copy=False)
        blocks *= per_block[..., :whole, None]
    if n % size:
        rows[..., whole * size :] *= per_block[..., whole:]
    return out


@dataclass(frozen=True, eq=False)
class Rounded:
    """A weight in one format as it is stored (integers and scales), dequantized only when
    asked: the sensitivity probes hold these, int8 and shared with the build's cache,
    instead of a float32 array per format (BENCHMARKS.md, issue 16)."""

    ints: np.ndarray
    spec: QuantSpec
    scales: np.ndarray

    def array(self) -> np.ndarray:
        return dequantize_weight(self.ints, self.spec, self.scales)
