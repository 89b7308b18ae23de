"""Tests for sfc.runtime.audio: loading, resampling, mono mixdown and one-line user errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sfc.errors import SfcError
from sfc.runtime.audio import SAMPLE_RATE, check_audio, load_audio

AUDIO_DIR = Path(__file__).parents[1] / "calibration_data" / "eval" / "audio"


def _sine(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _load_error(path: Path) -> str:
    with pytest.raises(SfcError) as info:
        load_audio(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg
    return msg


def test_real_flac_loads_as_float32_mono() -> None:
    path = sorted(AUDIO_DIR.glob("*.flac"))[0]
    audio = load_audio(path)
    raw, rate = sf.read(path, dtype="float32")
    assert rate == SAMPLE_RATE
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert audio.shape == raw.shape
    np.testing.assert_array_equal(audio, raw)
    assert np.abs(audio).max() <= 1.0


def test_missing_file(tmp_path: Path) -> None:
    assert "does not exist" in _load_error(tmp_path / "nope.wav")


def test_directory(tmp_path: Path) -> None:
    assert "directory" in _load_error(tmp_path)


def test_text_file_renamed_wav(tmp_path: Path) -> None:
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\nsecond line\n")
    assert "is not an audio file sfc can read" in _load_error(path)


def test_empty_wav(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), SAMPLE_RATE)
    assert "is empty" in _load_error(path)


def test_silent_wav(tmp_path: Path) -> None:
    path = tmp_path / "silent.wav"
    sf.write(path, np.zeros(SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE)
    msg = _load_error(path)
    assert "is silent (peak -inf dBFS)" in msg


def test_quiet_but_not_silent_passes(tmp_path: Path) -> None:
    # -60 dBFS is above the -70 dBFS floor and must load; -80 dBFS must not.
    path = tmp_path / "quiet.wav"
    sf.write(path, _sine(440, SAMPLE_RATE, 1.0, amp=1e-3), SAMPLE_RATE, subtype="FLOAT")
    assert load_audio(path).shape == (SAMPLE_RATE,)
    sf.write(path, _sine(440, SAMPLE_RATE, 1.0, amp=1e-4), SAMPLE_RATE, subtype="FLOAT")
    assert "peak -80.0 dBFS" in _load_error(path)


def test_non_finite_samples(tmp_path: Path) -> None:
    path = tmp_path / "nan.wav"
    data = _sine(440, SAMPLE_RATE, 0.5)
    data[100] = np.nan
    sf.write(path, data, SAMPLE_RATE, subtype="FLOAT")
    assert "non-finite" in _load_error(path)


def test_8khz_is_resampled(tmp_path: Path) -> None:
    path = tmp_path / "tone8k.wav"
    rate, freq, seconds = 8000, 440.0, 2.0
    sf.write(path, _sine(freq, rate, seconds), rate)
    audio = load_audio(path)
    assert audio.dtype == np.float32
    assert abs(audio.shape[0] - int(seconds * SAMPLE_RATE)) <= 1
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(audio.shape[0])))
    peak_hz = np.argmax(spectrum) * SAMPLE_RATE / audio.shape[0]
    assert abs(peak_hz - freq) <= 1.0
    assert np.abs(audio).max() <= 1.0


def test_44k1_is_resampled(tmp_path: Path) -> None:
    path = tmp_path / "tone44k.wav"
    sf.write(path, _sine(1000.0, 44100, 1.0), 44100)
    audio = load_audio(path)
    assert abs(audio.shape[0] - SAMPLE_RATE) <= 1
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * SAMPLE_RATE / audio.shape[0] - 1000.0) <= 1.0


def test_stereo_is_mixed_to_mono(tmp_path: Path) -> None:
    path = tmp_path / "stereo.wav"
    left = _sine(440, SAMPLE_RATE, 1.0, amp=0.5)
    right = np.zeros_like(left)
    sf.write(path, np.stack([left, right], axis=1), SAMPLE_RATE, subtype="FLOAT")
    audio = load_audio(path)
    assert audio.ndim == 1 and audio.shape == left.shape
    np.testing.assert_allclose(audio, left / 2, atol=1e-6)


def test_check_audio_on_arrays() -> None:
    stereo = np.stack([_sine(300, SAMPLE_RATE, 0.1), _sine(300, SAMPLE_RATE, 0.1)], axis=1)
    mono = check_audio(stereo.astype(np.float64), "clip")
    assert mono.dtype == np.float32 and mono.shape == (stereo.shape[0],)
    pcm = (np.array([0, 16384, -32768])).astype(np.int16)
    np.testing.assert_allclose(check_audio(pcm, "pcm"), [0.0, 0.5, -1.0])
    for bad, text in [
        (np.zeros(0, np.float32), "is empty"),
        (np.array([0.1, np.inf], np.float32), "non-finite"),
        (np.zeros(10, np.float32), "is silent"),
        (np.zeros((2, 2, 2), np.float32), "shape"),
    ]:
        with pytest.raises(SfcError, match=text) as info:
            check_audio(bad, "mem.wav")
        assert "\n" not in str(info.value) and "mem.wav" in str(info.value)


def test_import_does_not_pull_torch() -> None:
    code = (
        "import sys; import sfc.runtime.audio, sfc.runtime.features; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
