"""Calibration methods: from streamed statistics to a symmetric quantization scale.

Each method is a frozen config class; a handler registered for that class with
`@register(ConfigClass)` turns a `StatsSnapshot` into a clipping threshold, and
`compute_scale` turns the threshold into a signed symmetric scale:
scale = threshold / (2**(bits-1) - 1). New methods plug in by registering a handler; nothing
else changes.

All methods read only the |x| histogram and scalars, never activations. Thresholds are
never above absmax (a larger one only adds rounding error) and never NaN.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np

from ..errors import SfcError
from .stats import StatsSnapshot

__all__ = [
    "MIN_SCALE",
    "CalibMethod",
    "CalibResult",
    "EntropyCalib",
    "MaxCalib",
    "MseCalib",
    "PercentileCalib",
    "compute_scale",
    "compute_scales",
    "method_from_dict",
    "method_from_name",
    "method_names",
    "register",
]

# Floor for every scale. A tensor that was exactly zero on all calibration data (or whose
# threshold rounds to nothing) gets this tiny positive scale instead of 0 (a division by
# zero in Q) or NaN: zeros still quantize exactly, and 2**-30 is a float32 power of two
# whose products with weight scales (~1e-3) stay normal floats, unlike float32's `tiny`.
MIN_SCALE = 2.0**-30


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise SfcError(f"bits must be an integer in [2, 16] for signed symmetric scales, "
                       f"got {bits!r}")
    return bits


def _qmax(bits: int) -> int:
    """Largest level of signed symmetric quantization (127 for 8 bits, 7 for 4)."""
    return 2 ** (_check_bits(bits) - 1) - 1


# ---------------------------------------------------------------- configs


@dataclass(frozen=True)
class MaxCalib:
    """Threshold = absmax seen in calibration (no clipping)."""

    name: ClassVar[str] = "max"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description for the recipe."""
        return _config_dict(self)


@dataclass(frozen=True)
class PercentileCalib:
    """Threshold = the given percentile of |x| (read from the histogram, +-1 bin)."""

    percentile: float = 99.99
    name: ClassVar[str] = "percentile"

    def __post_init__(self) -> None:
        p = self.percentile
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 < p <= 100.0:
            raise SfcError(f"percentile must be a number in (0, 100], got {p!r}")
        object.__setattr__(self, "percentile", float(p))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description for the recipe."""
        return _config_dict(self)


@dataclass(frozen=True)
class EntropyCalib:
    """TensorRT's entropy calibration: the threshold minimising KL(P || Q) over |x|.

    `num_quant_bins` is the number of quantized levels of |x| the reference distribution is
    compressed into; None means 2**(bits-1), i.e. TensorRT's 128 at 8 bits and 8 at 4 bits.
    """

    num_quant_bins: int | None = None
    name: ClassVar[str] = "entropy"

    def __post_init__(self) -> None:
        n = self.num_quant_bins
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 2):
            raise SfcError(f"entropy num_quant_bins must be an integer >= 2, got {n!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description for the recipe."""
        return _config_dict(self)


@dataclass(frozen=True)
class MseCalib:
    """Threshold minimising the expected squared quantization error, clipping included."""

    name: ClassVar[str] = "mse"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description for the recipe."""
        return _config_dict(self)


CalibMethod = MaxCalib | PercentileCalib | EntropyCalib | MseCalib


def _config_dict(config: Any) -> dict[str, Any]:
    return {"method": config.name, **dataclasses.asdict(config)}


# ---------------------------------------------------------------- result


@dataclass(frozen=True)
class CalibResult:
    """A signed symmetric scale and how it was obtained (scale = threshold / qmax)."""

    scale: float
    threshold: float
    method: str
    stats_summary: dict[str, float]
    bits: int = 8

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        for label, value in (("scale", self.scale), ("threshold", self.threshold)):
            if not (isinstance(value, float) and math.isfinite(value) and value > 0.0):
                raise SfcError(f"calibration {label} must be a positive finite float, "
                               f"got {value!r}")
        if not math.isclose(self.threshold, self.scale * _qmax(self.bits), rel_tol=1e-9):
            raise SfcError("calibration threshold and scale disagree")
        if not all(math.isfinite(v) for v in self.stats_summary.values()):
            raise SfcError("calibration statistics summary is not finite")
        # A private copy: the frozen result must not change under the caller's feet.
        object.__setattr__(self, "stats_summary", dict(self.stats_summary))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the recipe."""
        return {"scale": self.scale, "threshold": self.threshold, "method": self.method,
                "bits": self.bits, "stats": dict(self.stats_summary)}


# ---------------------------------------------------------------- registry

ThresholdFn = Callable[[StatsSnapshot, Any, int], float]
_F = TypeVar("_F", bound=ThresholdFn)
_HANDLERS: dict[type, ThresholdFn] = {}
_BY_NAME: dict[str, type] = {}


def register(config_type: type) -> Callable[[_F], _F]:
    """Register `fn(stats, config, bits) -> threshold` for configs of `config_type`.

    The config class needs a ClassVar `name` (used by `method_from_name`); the decorator
    returns the function unchanged.
    """
    name = getattr(config_type, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{config_type.__name__} needs a ClassVar `name` to be registered")

    def decorator(fn: _F) -> _F:
        _HANDLERS[config_type] = fn
        _BY_NAME[name] = config_type
        return fn

    return decorator


def method_names() -> list[str]:
    """Names accepted by `method_from_name`."""
    return sorted(_BY_NAME)


def method_from_name(name: str, **params: Any) -> Any:
    """The config for `name` ("max", "percentile", "entropy", "mse"), with optional params."""
    config_type = _BY_NAME.get(name.strip().lower())
    if config_type is None:
        raise SfcError(f"unknown calibration method {name!r}; "
                       f"choose from {', '.join(method_names())}")
    try:
        return config_type(**params)
    except TypeError:
        raise SfcError(f"calibration method {name!r} does not take parameters "
                       f"{', '.join(sorted(params))}") from None


def method_from_dict(data: Mapping[str, Any]) -> Any:
    """Inverse of `config.to_dict()` (for replaying a recipe)."""
    params = dict(data)
    name = params.pop("method", None)
    if not isinstance(name, str):
        raise SfcError("calibration method entry has no 'method' name")
    return method_from_name(name, **params)


def compute_scale(stats: StatsSnapshot, method: Any, bits: int = 8) -> CalibResult:
    """The signed symmetric scale for `stats` by `method` at `bits` bits.

    All-zero statistics give MIN_SCALE (see its comment); a tensor never observed
    (count 0) is a user error.
    """
    qmax = _qmax(bits)
    handler = next((_HANDLERS[t] for t in type(method).__mro__ if t in _HANDLERS), None)
    if handler is None:
        raise SfcError(f"no calibration handler for {type(method).__name__}; "
                       f"choose from {', '.join(method_names())}")
    if stats.count == 0:
        raise SfcError(f"no calibration statistics for tensor '{stats.name}' (no values seen)")
    threshold = 0.0 if stats.absmax == 0.0 else float(handler(stats, method, bits))
    if not math.isfinite(threshold) or threshold < 0.0:  # a handler bug, never user data
        raise SfcError(f"calibration method {method.name!r} produced threshold {threshold} "
                       f"for tensor '{stats.name}'")
    threshold = min(threshold, stats.absmax)
    scale = max(threshold / qmax, MIN_SCALE)
    return CalibResult(scale=scale, threshold=scale * qmax, method=method.name,
                       stats_summary=stats.summary(), bits=bits)


def compute_scales(stats: Mapping[str, StatsSnapshot], method: Any,
                   bits: int = 8) -> dict[str, CalibResult]:
    """`compute_scale` for every tensor of `collect_stats`' result."""
    return {name: compute_scale(s, method, bits) for name, s in stats.items()}


# ---------------------------------------------------------------- handlers


@register(MaxCalib)
def _max_threshold(stats: StatsSnapshot, config: MaxCalib, bits: int) -> float:
    return stats.absmax


@register(PercentileCalib)
def _percentile_threshold(stats: StatsSnapshot, config: PercentileCalib, bits: int) -> float:
    return stats.percentile(config.percentile)


def _occupied_bins(stats: StatsSnapshot) -> int:
    """Number of leading bins that can hold data (up to and including absmax's bin)."""
    return min(stats.bins, math.floor(stats.absmax / stats.bin_width) + 1)


@register(EntropyCalib)
def _entropy_threshold(stats: StatsSnapshot, config: EntropyCalib, bits: int) -> float:
    """TensorRT's KL search (as in MXNet / ORT / ModelOpt), vectorised per candidate.

    For each candidate of i bins: P = hist[:i] with everything above folded into the last
    bin; Q = hist[:i] merged into `nq` levels and spread back evenly over the bins where P
    is non-zero. The threshold is the upper edge of the candidate with the least KL(P || Q).
    """
    nq = config.num_quant_bins or 2 ** (bits - 1)
    if stats.bins < nq:
        raise SfcError(f"entropy calibration needs at least {nq} histogram bins, "
                       f"tensor '{stats.name}' has {stats.bins}")
    h = stats.hist.astype(np.float64)
    if h.size > 1:
        # ModelOpt's fix: the spike of exact zeros (ReLU) would otherwise dominate the
        # divergence and drive every threshold to the smallest candidate.
        h[0] = h[1]
    top = max(nq, _occupied_bins(stats))
    suffix = np.concatenate([np.cumsum(h[::-1])[::-1], [0.0]])  # suffix[i] = sum(h[i:])
    positions = np.arange(top, dtype=np.int64)
    best_i, best_kl = top, math.inf
    for i in range(nq, top + 1):
        sliced = h[:i]
        p = sliced.copy()
        p[-1] += suffix[i]
        nonzero = p > 0
        level = (positions[:i] * nq) // i  # even split of i bins into nq levels
        level_sum = np.bincount(level, weights=sliced, minlength=nq)
        level_nz = np.bincount(level, weights=nonzero, minlength=nq)
        q = np.where(nonzero, level_sum[level] / np.maximum(level_nz[level], 1.0), 0.0)
        kl = _kl_divergence(p, q)
        if kl < best_kl:  # first minimum: the smallest threshold among ties
            best_i, best_kl = i, kl
    return best_i * stats.bin_width


def _kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """KL(P || Q) of two count vectors; zero Q entries under non-zero P are smoothed.

    Q is non-zero only where P is, so only Q needs smoothing (eps in count units, as
    MXNet's and ORT's `smooth_distribution` do).
    """
    p_sum, q = p.sum(), np.where(q > 0, q, 1e-4)
    q_sum = q.sum()
    if p_sum <= 0:
        return math.inf
    mask = p > 0
    pn = p[mask] / p_sum
    return float(np.sum(pn * np.log(pn / (q[mask] / q_sum))))


_MSE_CHUNK = 128


def _rounding_integral(x: np.ndarray, step: np.ndarray) -> np.ndarray:
    """G(x) = integral from -step/2 to x of (y - step * round(y / step))**2 dy (broadcast)."""
    n = np.floor(x / step + 0.5)
    r = x - n * step
    cube = step * step * step
    return n * (cube / 12.0) + (r * r * r + cube / 8.0) / 3.0  # r*r*r: ** is slow on arrays


@register(MseCalib)
def _mse_threshold(stats: StatsSnapshot, config: MseCalib, bits: int) -> float:
    """argmin over candidate thresholds t of sum_bins count * E[(x - Q_t(x))**2].

    The expectation inside a bin assumes values spread uniformly over it and is exact for
    that density (closed-form integrals), rather than evaluated at the bin centre: a centre
    aliases against the quantization grid and makes the error curve jagged. Values above t
    clip to t. Candidates are the bin edges below absmax, plus absmax itself.
    """
    qmax = _qmax(bits)
    w = stats.bin_width
    top = _occupied_bins(stats)
    counts = stats.hist[:top].astype(np.float64)
    edges = np.arange(top + 1, dtype=np.float64) * w
    centres = edges[:-1] + w / 2
    candidates = np.append(edges[1:top], stats.absmax)
    candidates = candidates[candidates <= stats.absmax]
    # Suffix sums give the clipping error of all bins wholly above t in O(1) per candidate.
    def suffix(v: np.ndarray) -> np.ndarray:
        return np.append(np.cumsum(v[::-1])[::-1], 0.0)

    s0, s1, s2 = suffix(counts), suffix(counts * centres), suffix(counts * centres**2)
    errors = np.empty(candidates.size)
    # Rounding error, candidates x edges in chunks: vectorised, bounded temporaries; the
    # candidates ascend, so a chunk only needs the edges up to its largest threshold.
    for start in range(0, candidates.size, _MSE_CHUNK):
        t = candidates[start:start + _MSE_CHUNK]
        m = min(top, math.ceil(float(t[-1]) / w))
        g = _rounding_integral(np.minimum(edges[None, :m + 1], t[:, None]), (t / qmax)[:, None])
        rounding = np.diff(g, axis=1) @ counts[:m]
        # Clipping error: the bin holding t (partly above it), then every bin above.
        j0 = np.minimum((t / w).astype(np.int64), top - 1)
        part = (edges[j0 + 1] - t) ** 3 - np.maximum(edges[j0] - t, 0.0) ** 3
        rest = j0 + 1
        whole = w * (s2[rest] - 2 * t * s1[rest] + t**2 * s0[rest] + s0[rest] * w**2 / 12)
        errors[start:start + _MSE_CHUNK] = (rounding + counts[j0] * part / 3.0 + whole) / w
    return float(candidates[int(np.argmin(errors))])
