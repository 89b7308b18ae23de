"""Label-free training audio: seeded speed, reverberation and noise perturbations of a
clip (the teacher transcribes the result, so no label has to survive them).

Speed as in Kaldi's speed perturbation (resampling: tempo and pitch together, 0.9x or
1.1x), reverberation by a synthetic room response (exponentially decaying noise with an
RT60 of 0.2-0.6 s), and white noise at 10-30 dB SNR. One `numpy` generator per clip and
copy, so the same seed gives the same audio.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.signal import fftconvolve, resample_poly

__all__ = ["SPEEDS", "augment"]

SPEEDS = ((9, 10), (1, 1), (11, 10))  # (up, down): 0.9x, 1x, 1.1x the duration
_RT60 = (0.2, 0.6)
_SNR_DB = (10.0, 30.0)


def augment(audio: np.ndarray, seed: int | Sequence[int],
            sample_rate: int = 16000) -> np.ndarray:
    """A perturbed copy of mono float32 `audio`, fully determined by `seed` (an int or a
    sequence of ints, e.g. (build seed, copy, clip index))."""
    rng = np.random.default_rng(seed)
    x = np.asarray(audio, dtype=np.float64)
    up, down = SPEEDS[int(rng.integers(len(SPEEDS)))]
    if up != down:
        x = resample_poly(x, up, down)
    if rng.random() < 0.5:
        rt60 = rng.uniform(*_RT60)
        t = np.arange(int(rt60 * sample_rate)) / sample_rate
        response = rng.standard_normal(t.size) * np.exp(-6.9 * t / rt60)  # -60 dB at rt60
        response[0] = 1.0 + abs(response[0])  # the direct path dominates
        wet = fftconvolve(x, response)[: x.size]
        x = wet * (np.abs(x).max() / max(np.abs(wet).max(), 1e-12))
    power = float(np.mean(x**2))
    if power > 0:
        snr = rng.uniform(*_SNR_DB)
        x = x + rng.standard_normal(x.size) * np.sqrt(power / 10 ** (snr / 10))
    peak = np.abs(x).max()
    if peak > 1.0:
        x = x / peak
    return x.astype(np.float32)
