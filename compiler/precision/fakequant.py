"""Differentiable fake quantization (torch) in exactly the layouts the QDQ writer stores.

The forward value is bit for bit `dequantize_weight(quantize_weight(w, spec, s), spec, s)`:
the same float32 division, round half to even, clip (each zero-point block to its own
integer window, computed the same way) and product. Gradients follow LSQ
(Esser et al. 2020): straight through the rounding to the weight inside the range, and
to the scale through both the division and the product. Weights are in ONNX layout
(MatMul B [K, N]); block specs group K (axis 0), channel specs have one scale per N.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import SfcError
from ..quant.spec import QuantSpec
from ..quant.weights import scale_shape

if TYPE_CHECKING:
    import torch

__all__ = ["expand_scales", "fake_quantize"]


def expand_scales(scales: torch.Tensor, spec: QuantSpec, shape: tuple[int, ...]
                  ) -> torch.Tensor:
    """`scales` (the DequantizeLinear layout) expanded to one scale per element of a weight
    of `shape` (torch twin of `quant.weights.broadcast_scales`, differentiable)."""
    expected = scale_shape(shape, spec)
    if tuple(scales.shape) != expected:
        raise SfcError(f"scales have shape {tuple(scales.shape)}, expected {expected} for "
                       f"{spec.describe()}")
    if spec.granularity == "tensor":
        return scales.expand(shape)
    assert spec.axis is not None
    if spec.granularity == "channel":
        view = [1] * len(shape)
        view[spec.axis] = shape[spec.axis]
        return scales.reshape(view).expand(shape)
    assert spec.block_size is not None
    full = scales.repeat_interleave(spec.block_size, dim=spec.axis)
    return full.narrow(spec.axis, 0, shape[spec.axis])


def fake_quantize(w: torch.Tensor, scales: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize-dequantize `w` (float32) with `scales` under `spec`."""
    import torch

    if w.dtype != torch.float32 or scales.dtype != torch.float32:
        raise SfcError("fake quantization works in float32 (the QDQ writer's precision)")
    shape = tuple(w.shape)
    if spec.granularity == "block" and spec.axis == 0 and w.ndim == 2:
        # Blocks: broadcast [K/b, 1, N] scales over a [K/b, b, N] view rather than
        # materialising one scale per element (same quotients, far less memory); a partial
        # last block is padded with zeros, as `quant.weights` pads it.
        assert spec.block_size is not None
        if tuple(scales.shape) != scale_shape(shape, spec):
            raise SfcError(f"scales have shape {tuple(scales.shape)}, expected "
                           f"{scale_shape(shape, spec)} for {spec.describe()}")
        pad = -shape[0] % spec.block_size
        padded = torch.nn.functional.pad(w, (0, 0, 0, pad)) if pad else w
        blocks = padded.reshape(-1, spec.block_size, shape[1])
        s = scales.unsqueeze(1)
        lo, hi = _bounds(blocks, s, spec)
        return (_round_clip(blocks / s, lo, hi) * s).reshape(-1, shape[1])[:shape[0]]
    if spec.zero_point:
        raise SfcError(f"fake quantization models zero points on 2-D block(axis 0) weights "
                       f"only, not {spec.describe()} of shape {shape}")
    s = expand_scales(scales, spec, shape)
    lo, hi = _bounds(w, s, spec)
    q = _round_clip(w / s, lo, hi)
    if spec.pair_limit is not None:
        assert spec.axis is not None  # pair limits are per-channel (QuantSpec checks)
        q = _limit_pairs(q, spec.axis, spec.pair_limit)
    return (q * s).reshape(shape)


def _limit_pairs(q: torch.Tensor, axis: int, limit: int) -> torch.Tensor:
    """`q` with `quant.weights.limit_pairs`' change added (the same integers: the excess of
    each K-adjacent pair over `limit` split between the two), outside the gradient, as
    the rounding is: an INT8 weight for a CPU without VNNI (`ort-cpu:avx2`)."""
    import torch

    with torch.no_grad():
        rows = torch.movedim(q, axis, 0)
        moved = rows.shape
        rows = rows.reshape(moved[0], -1)
        even = rows.shape[1] - rows.shape[1] % 2
        a, b = rows[:, 0:even:2], rows[:, 1:even:2]
        over = torch.clamp(a.abs() + b.abs() - limit, min=0)
        a_larger = a.abs() >= b.abs()
        big, small = torch.floor((over + 1) / 2), torch.floor(over / 2)
        delta = torch.zeros_like(rows)
        delta[:, 0:even:2] = -torch.sign(a) * torch.where(a_larger, big, small)
        delta[:, 1:even:2] = -torch.sign(b) * torch.where(a_larger, small, big)
        delta = torch.movedim(delta.reshape(moved), 0, axis)
    return q + delta


def _round_clip(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    import torch

    # x + (round(x) - x) is exactly round(x) in float32 (Sterbenz), with an identity
    # gradient: the straight-through estimator without changing the forward value.
    return torch.clamp(x + (torch.round(x) - x).detach(), lo, hi)


def _bounds(blocks: torch.Tensor, s: torch.Tensor, spec: QuantSpec
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each block's integer window (`quant.weights.integer_bounds`, same float32 steps),
    outside the gradient; the spec's range when it has no zero point."""
    import torch

    if not spec.zero_point:
        return (torch.tensor(float(spec.qmin), device=s.device),
                torch.tensor(float(spec.qmax), device=s.device))
    with torch.no_grad():
        low = torch.clamp(blocks.amin(dim=1, keepdim=True), max=0.0)
        high = torch.clamp(blocks.amax(dim=1, keepdim=True), min=0.0)
        mid = (low + high) / (2 * s)
        lo = torch.clamp(torch.round(mid - spec.span / 2), -spec.span, 0)
    return lo, lo + spec.span
