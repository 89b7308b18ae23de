"""Streaming |x| histograms: exact re-binning, bounded memory, percentiles, bad values."""

from __future__ import annotations

import numpy as np
import pytest

from sfc.calib import StatsSnapshot, TensorStats
from sfc.errors import SfcError


def _stream(batches: list[np.ndarray], bins: int = 2048) -> StatsSnapshot:
    acc = TensorStats("t", bins)
    for b in batches:
        acc.update(b)
    return acc.snapshot()


def test_rebinning_keeps_count_absmax_and_matches_direct_binning() -> None:
    rng = np.random.default_rng(0)
    # Each batch wider than the last: the range grows several times (by 2**k, merging bins).
    batches = [rng.standard_normal((64, 33)).astype(np.float32) * 3.0**i for i in range(8)]
    snap = _stream(batches)
    data = np.concatenate([b.ravel() for b in batches])
    assert snap.count == data.size == int(snap.hist.sum())
    assert snap.absmax == float(np.abs(data).max())
    assert (snap.min, snap.max) == (float(data.min()), float(data.max()))
    assert snap.absmax < snap.hist_max <= 2.01 * snap.absmax
    # Merged counts equal binning all data at the final range from the start (up to values
    # within a float32 rounding of a bin edge, which numpy bins in float64).
    direct, _ = np.histogram(np.abs(data.astype(np.float64)), bins=snap.bins,
                             range=(0.0, snap.hist_max))
    assert np.abs(snap.hist - direct).sum() <= 1e-4 * data.size


def test_memory_bounded_after_many_growing_batches() -> None:
    rng = np.random.default_rng(1)
    acc = TensorStats("t", bins=512)
    total = 0
    for i in range(300):
        batch = rng.standard_normal(100) * 1.05**i
        acc.update(batch)
        total += batch.size
        assert acc._hist.shape == (512,)  # fixed bins, whatever the range
    snap = acc.snapshot()
    assert snap.count == total and snap.hist.shape == (512,)


def test_histogram_percentile_within_one_bin_of_numpy() -> None:
    rng = np.random.default_rng(2)
    batches = [rng.standard_t(3, size=20_000) * (1 + i) for i in range(5)]
    snap = _stream(batches)
    mag = np.abs(np.concatenate(batches))
    for q in (50.0, 90.0, 99.0, 99.9, 99.99, 100.0):
        assert abs(snap.percentile(q) - np.percentile(mag, q)) <= snap.bin_width


def test_zeros_then_values_and_all_zero() -> None:
    snap = _stream([np.zeros(10), np.array([0.0, -2.0, 1.0])], bins=8)
    assert snap.count == 13 and snap.hist[0] == 11 and snap.absmax == 2.0
    zero = _stream([np.zeros((3, 4), np.float32)])
    assert zero.count == 12 and zero.absmax == 0.0 and zero.hist_max == 0.0
    assert zero.percentile(99.0) == 0.0


def test_integer_and_half_inputs_are_counted() -> None:
    snap = _stream([np.array([[1, -5, 3]], dtype=np.int64), np.array([True, False]),
                    np.array([-6.5, 2.0], dtype=np.float16)])
    assert snap.count == 7 and snap.absmax == 6.5 and snap.min == -6.5 and snap.max == 3.0


@pytest.mark.parametrize("bad,kind", [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_non_finite_batch_names_tensor(bad: float, kind: str) -> None:
    acc = TensorStats("enc/fc2_in", 16)
    acc.update(np.ones(4, np.float32))
    with pytest.raises(SfcError, match=f"{kind} in activation statistics of tensor 'enc/fc2_in'"):
        acc.update(np.array([1.0, bad], np.float32))


def test_snapshot_is_frozen_and_validated() -> None:
    snap = _stream([np.arange(10.0)], bins=4)
    with pytest.raises(AttributeError):
        snap.absmax = 3.0  # type: ignore[misc]
    with pytest.raises(ValueError):
        snap.hist[0] = 7
    with pytest.raises(SfcError):
        StatsSnapshot("x", 5, 1.0, -1.0, 1.0, 2.0, np.array([1, 1]))  # hist sums to 2, not 5
    with pytest.raises(SfcError):
        TensorStats("x", bins=0)
