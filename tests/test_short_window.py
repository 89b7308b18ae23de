"""benchmarks/short_window.py: window arguments, the cut features and the table (the
export's any-frames encoder is tested in test_export.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sfc.errors import SfcError
from sfc.runtime.features import LogMelSpec, whisper_windows
from tests.conftest import bench_module

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


@pytest.fixture(scope="module")
def sw() -> Any:
    """The script as a module (it imports its sibling `common` by name)."""
    return bench_module("short_window")


def test_parse_windows_keeps_order_and_drops_repeats(sw: Any) -> None:
    assert sw.parse_windows("15, 8,15,10") == (15, 8, 10)


@pytest.mark.parametrize("text", ["", "8,x", "8,0", "-5"])
def test_parse_windows_refuses_bad_lists(sw: Any, text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        sw.parse_windows(text)


def test_with_baseline_puts_the_baseline_first_then_longest(sw: Any) -> None:
    assert sw.with_baseline((8, 15, 10), 30) == (30, 15, 10, 8)
    assert sw.with_baseline((10, 30), 30) == (30, 10)


def test_with_baseline_refuses_windows_past_the_model(sw: Any) -> None:
    with pytest.raises(SfcError, match="exceed"):
        sw.with_baseline((40, 10), 30)


def test_window_frames_follow_the_hop(sw: Any) -> None:
    assert sw.window_frames(30, LogMelSpec()) == LogMelSpec().n_frames
    assert sw.window_frames(8, LogMelSpec(hop_length=320)) == 400


def _tone(seconds: float, spec: LogMelSpec) -> np.ndarray:
    t = np.arange(int(seconds * spec.sample_rate)) / spec.sample_rate
    return (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def test_short_windows_is_the_start_of_the_30s_window(sw: Any) -> None:
    spec = LogMelSpec()
    audio = _tone(2.5, spec)
    cut = sw.short_windows(audio, spec, 800)
    full = whisper_windows(audio, spec)
    assert cut.shape == (1, spec.n_mels, 800)
    assert cut.flags.c_contiguous
    np.testing.assert_array_equal(cut, full[:, :, :800])
    content = len(audio) // spec.hop_length
    assert np.all(cut[..., content:] == 0.0)  # past the clip: only the window's padding
    assert np.any(cut[..., :content] != 0.0)


def test_short_windows_takes_a_clip_that_just_fits_and_refuses_a_longer_one(sw: Any) -> None:
    spec = LogMelSpec()
    assert sw.short_windows(_tone(8.0, spec), spec, 800).shape == (1, spec.n_mels, 800)
    with pytest.raises(SfcError, match="does not fit"):
        sw.short_windows(_tone(8.02, spec), spec, 800)


def test_rotated_wraps(sw: Any) -> None:
    assert sw.rotated([30, 15, 10], 0) == [30, 15, 10]
    assert sw.rotated([30, 15, 10], 4) == [15, 10, 30]


def test_table_rows_mark_a_window_that_loses(sw: Any) -> None:
    def variant(delta: dict[str, float] | None, loses: bool, median: float) -> dict[str, Any]:
        return {"frames": 1, "eval": {"wer": 0.1, "ci_lo": 0.05, "ci_hi": 0.15,
                                      "loop_stops": 2, "rtf": 0.2},
                "paired_vs_baseline": delta, "loses": loses, "encoder_median_s": median,
                "encoder_speedup": 0.5 / median}

    result = {"windows": [30, 8], "variants": {
        "30": variant(None, False, 0.5),
        "8": variant({"delta": 0.02, "lo": 0.01, "hi": 0.03}, True, 0.125)}}
    base, short = sw.table_rows(result)
    assert base[3] == "-" and base[4] == "no"
    assert short[3] == "+2.00 [+1.00, +3.00]" and short[4] == "yes"
    assert short[7] == "4.00x"
