"""Training-audio augmentation: seeded, bounded, and it really perturbs."""

from __future__ import annotations

import numpy as np

from sfc.calib.augment import augment


def _tone(seconds: float = 2.0) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_same_seed_same_audio_other_seed_other_audio() -> None:
    x = _tone()
    a, b = augment(x, (0, 0, 5)), augment(x, (0, 0, 5))
    assert a.dtype == np.float32 and np.array_equal(a, b)
    others = [augment(x, (0, 0, i)) for i in range(6)]
    assert any(o.shape != a.shape or not np.array_equal(o, a) for o in others)


def test_perturbations_stay_in_range_and_change_speed_and_noise() -> None:
    x = _tone()
    lengths = set()
    for seed in range(40):
        y = augment(x, seed)
        assert np.abs(y).max() <= 1.0 and np.isfinite(y).all()
        lengths.add(len(y))
        n = min(len(x), len(y))
        if len(y) == len(x):  # no speed change: the residual is the noise/reverb
            residual = y[:n] - x[:n]
            assert float(np.mean(residual**2)) > 0
    # 0.9x, 1x and 1.1x durations all occur.
    assert lengths == {len(x) * 9 // 10, len(x), len(x) * 11 // 10}
