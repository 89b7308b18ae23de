"""Calibration methods on synthetic statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sfc.calib import (
    MIN_SCALE,
    CalibResult,
    EntropyCalib,
    MaxCalib,
    MseCalib,
    PercentileCalib,
    StatsSnapshot,
    TensorStats,
    compute_scale,
    method_from_dict,
    method_from_name,
    register,
)
from sfc.errors import SfcError

METHODS = [MaxCalib(), PercentileCalib(), EntropyCalib(), MseCalib()]


def _stats(data: np.ndarray, batches: int = 8) -> StatsSnapshot:
    acc = TensorStats("act")
    for b in np.array_split(data, batches):
        acc.update(b)
    return acc.snapshot()


def _sim_mse(data: np.ndarray, scale: float, bits: int = 8) -> float:
    """Quantize the real samples (signed symmetric, clipped) and measure the error."""
    qmax = 2 ** (bits - 1) - 1
    deq = np.clip(np.round(data / scale), -qmax, qmax) * scale
    return float(np.mean((deq - data) ** 2))


@pytest.fixture(scope="module")
def gaussian() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(1_000_000)


@pytest.fixture(scope="module")
def outliers(gaussian: np.ndarray) -> np.ndarray:
    data = gaussian.copy()
    data[[10, 500_000, 999_000]] = [300.0, -250.0, 280.0]
    return data


def test_gaussian_mse_threshold_below_absmax(gaussian: np.ndarray) -> None:
    stats = _stats(gaussian)
    mse = compute_scale(stats, MseCalib())
    # The MSE-optimal 8-bit clip of N(0, 1) is about 3.9 sigma (Banner et al., ACIQ).
    assert 3.6 < mse.threshold < 0.9 * stats.absmax
    max_scale = compute_scale(stats, MaxCalib()).scale
    assert _sim_mse(gaussian, mse.scale) < _sim_mse(gaussian, max_scale)
    # Fewer levels clip harder: about 2.5 sigma at 4 bits.
    assert 2.2 < compute_scale(stats, MseCalib(), bits=4).threshold < 2.8


def test_outliers_max_vs_clipping_methods(outliers: np.ndarray) -> None:
    stats = _stats(outliers)
    results = {m.name: compute_scale(stats, m) for m in METHODS}
    assert results["max"].threshold == 300.0
    assert results["percentile"].threshold < 5.0
    assert results["entropy"].threshold < 0.1 * 300.0
    assert results["mse"].threshold < 0.5 * 300.0
    # MSE's scale really has a lower error than max's on the real samples.
    mse_error = _sim_mse(outliers, results["mse"].scale)
    assert mse_error < 0.5 * _sim_mse(outliers, results["max"].scale)


def test_results_deterministic_and_consistent(outliers: np.ndarray) -> None:
    stats = _stats(outliers)
    again = _stats(outliers, batches=3)  # different batching, same histogram
    np.testing.assert_array_equal(stats.hist, again.hist)
    for m in METHODS:
        for bits in (8, 4):
            r = compute_scale(stats, m, bits=bits)
            assert r == compute_scale(again, m, bits=bits)
            assert r.scale == pytest.approx(r.threshold / (2 ** (bits - 1) - 1), rel=1e-12)
            assert r.method == m.name and r.bits == bits
            assert r.stats_summary["absmax"] == 300.0
            json.dumps(r.to_dict())


def test_all_zero_stats_give_tiny_scale() -> None:
    stats = _stats(np.zeros(1000))
    for m in METHODS:
        r = compute_scale(stats, m)
        assert r.scale == MIN_SCALE and np.isfinite(r.threshold) and r.threshold > 0


def test_mostly_zero_percentile_does_not_crash() -> None:
    data = np.zeros(1_000_000)
    data[:5] = 1.0  # 99.99th percentile of |x| is 0
    r = compute_scale(_stats(data), PercentileCalib())
    assert r.scale >= MIN_SCALE and np.isfinite(r.scale)


def test_relu_like_data_entropy_is_sane() -> None:
    data = np.maximum(np.random.default_rng(3).standard_normal(200_000), 0.0)
    r = compute_scale(_stats(data), EntropyCalib())
    assert 2.0 < r.threshold <= float(data.max())


def test_empty_stats_and_bad_arguments() -> None:
    empty = TensorStats("never").snapshot()
    with pytest.raises(SfcError, match="'never'"):
        compute_scale(empty, MaxCalib())
    stats = _stats(np.arange(100.0))
    with pytest.raises(SfcError):
        compute_scale(stats, MaxCalib(), bits=1)
    with pytest.raises(SfcError):
        compute_scale(stats, object())
    with pytest.raises(SfcError):
        PercentileCalib(0.0)
    with pytest.raises(SfcError):
        PercentileCalib(float("nan"))
    with pytest.raises(SfcError):
        EntropyCalib(1)
    with pytest.raises(SfcError):
        CalibResult(scale=float("nan"), threshold=1.0, method="max", stats_summary={})


def test_names_and_dicts_round_trip() -> None:
    assert method_from_name("max") == MaxCalib()
    assert method_from_name("Percentile", percentile=99.9) == PercentileCalib(99.9)
    assert method_from_name("entropy") == EntropyCalib()
    assert method_from_name("mse") == MseCalib()
    for m in [*METHODS, PercentileCalib(99.0), EntropyCalib(64)]:
        d = m.to_dict()
        assert d["method"] == m.name and method_from_dict(json.loads(json.dumps(d))) == m
    with pytest.raises(SfcError, match="unknown calibration method"):
        method_from_name("minmax")
    with pytest.raises(SfcError):
        method_from_name("max", percentile=3.0)


def test_register_returns_function_and_dispatches() -> None:
    from dataclasses import dataclass
    from typing import ClassVar

    @dataclass(frozen=True)
    class HalfMax:
        name: ClassVar[str] = "test-half-max"

    def half(stats: StatsSnapshot, config: HalfMax, bits: int) -> float:
        return stats.absmax / 2

    assert register(HalfMax)(half) is half
    r = compute_scale(_stats(np.arange(-10.0, 11.0)), HalfMax())
    assert r.threshold == 5.0 and r.method == "test-half-max"
