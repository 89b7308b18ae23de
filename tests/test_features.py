"""Tests for sfc.runtime.features against transformers' WhisperFeatureExtractor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sfc.errors import SfcError
from sfc.runtime.audio import load_audio
from sfc.runtime.features import LogMelSpec, log_mel, mel_filters, whisper_windows

AUDIO_DIR = Path(__file__).parents[1] / "calibration_data" / "eval" / "audio"
TOL = 1e-4
SR = 16000

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def extractor() -> object:
    return transformers.WhisperFeatureExtractor()


def _reference(extractor: object, audio: np.ndarray) -> np.ndarray:
    out = extractor(audio, sampling_rate=SR, return_tensors="np")  # type: ignore[operator]
    return np.asarray(out.input_features[0])


def _files(n: int) -> list[Path]:
    files = sorted(AUDIO_DIR.glob("*.flac"))
    assert len(files) >= n, f"need {n} calibration files in {AUDIO_DIR}"
    return files[:n]


def test_spec_defaults_and_roundtrip() -> None:
    spec = LogMelSpec()
    assert spec.n_samples == 480000
    assert spec.n_frames == 3000
    d = spec.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert LogMelSpec.from_dict(d) == spec
    other = LogMelSpec(n_mels=128)
    assert LogMelSpec.from_dict(json.loads(json.dumps(other.to_dict()))) == other


def test_spec_from_dict_rejects_bad_input() -> None:
    with pytest.raises(SfcError, match=r"card\.json") as info:
        LogMelSpec.from_dict({"n_mels": 80, "bogus": 1}, source="card.json")
    assert "bogus" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(SfcError, match=r"card\.json"):
        LogMelSpec.from_dict({"n_mels": "80"}, source="card.json")
    with pytest.raises(SfcError):
        LogMelSpec.from_dict({"hop_length": 0})


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_transformers(n_mels: int) -> None:
    from transformers.audio_utils import mel_filter_bank

    spec = LogMelSpec(n_mels=n_mels)
    ref = mel_filter_bank(
        num_frequency_bins=1 + spec.n_fft // 2,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=spec.sample_rate / 2,
        sampling_rate=spec.sample_rate,
        norm="slaney",
        mel_scale="slaney",
    )
    ours = mel_filters(spec)
    assert ours.shape == ref.shape == (201, n_mels)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    assert mel_filters(spec) is ours  # cached


def test_log_mel_matches_transformers_on_real_audio(extractor: object) -> None:
    for path in _files(4):
        audio = load_audio(path)
        ours = log_mel(audio)
        ref = _reference(extractor, audio)
        assert ours.dtype == np.float32 and ours.shape == (80, 3000)
        diff = float(np.abs(ours - ref).max())
        assert diff <= TOL, f"{path.name}: max abs diff {diff}"


def test_log_mel_long_audio_is_truncated_like_transformers(extractor: object) -> None:
    # Concatenate real files past 30 s; both sides must truncate to the first window.
    parts: list[np.ndarray] = []
    for path in sorted(AUDIO_DIR.glob("*.flac")):
        parts.append(load_audio(path))
        if sum(p.shape[0] for p in parts) > 40 * SR:
            break
    long = np.concatenate(parts)
    assert long.shape[0] > 30 * SR
    ours = log_mel(long)
    diff = float(np.abs(ours - _reference(extractor, long)).max())
    assert diff <= TOL, f"max abs diff {diff}"
    np.testing.assert_array_equal(ours, log_mel(long[: 30 * SR]))


def test_log_mel_tracks_content() -> None:
    # A 1 kHz tone must light up the mel bands around 1 kHz, not the extremes.
    t = np.arange(5 * SR) / SR
    feats = log_mel((0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32))
    band = int(np.argmax(feats[:, :400].mean(axis=1)))
    centres = np.argmax(mel_filters(LogMelSpec()), axis=0) * SR / 400
    assert abs(centres[band] - 1000) < 100
    # After the tone ends, the padding sits at the floor (max - 8 -> lowest value).
    assert np.allclose(feats[:, 600:], feats.min())


def test_log_mel_rejects_multichannel() -> None:
    with pytest.raises(ValueError):
        log_mel(np.zeros((SR, 2), dtype=np.float32))


def test_whisper_windows_count_and_padding() -> None:
    assert whisper_windows(np.full(65 * SR, 0.1, np.float32)).shape == (3, 80, 3000)
    assert whisper_windows(np.full(30 * SR, 0.1, np.float32)).shape == (1, 80, 3000)
    assert whisper_windows(np.full(30 * SR + 160, 0.1, np.float32)).shape == (2, 80, 3000)
    audio = load_audio(_files(1)[0])
    win = whisper_windows(audio)[0]
    content = audio.shape[0] // 160
    # Inside the audio it is transformers' log-mel; after it, zeros in log-mel space.
    ref = log_mel(audio)
    assert float(np.abs(win[:, : content - 2] - ref[:, : content - 2]).max()) <= TOL
    assert not win[:, content:].any()


def test_whisper_windows_match_faster_whisper() -> None:
    """The windows equal faster-whisper's (OpenAI's convention), long audio included."""
    fw = pytest.importorskip("faster_whisper.feature_extractor")
    audio = np.concatenate([load_audio(p) for p in _files(12)])
    assert audio.shape[0] > 30 * SR
    full = fw.FeatureExtractor()(audio, padding=30 * SR)
    content = full.shape[-1] - 3000
    ours = whisper_windows(audio)
    assert ours.shape[0] == -(-content // 3000)
    for i, win in enumerate(ours):
        seg = full[:, i * 3000 : min((i + 1) * 3000, content)]
        diff = float(np.abs(win[:, : seg.shape[1]] - seg).max())
        assert diff <= TOL, f"window {i}: max abs diff {diff}"
        assert not win[:, seg.shape[1] :].any()


def test_stft_in_blocks_equals_the_whole_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import sfc.runtime.features as features

    rng = np.random.default_rng(3)
    wave = (rng.standard_normal(SR * 3) * 0.1).astype(np.float32)
    spec = LogMelSpec()
    n_frames = len(wave) // spec.hop_length
    monkeypatch.setattr(features, "STFT_BLOCK", 10**9)
    whole = features._log_power(wave, spec, n_frames)
    monkeypatch.setattr(features, "STFT_BLOCK", 7)  # blocks that do not divide the frames
    blocked = features._log_power(wave, spec, n_frames)
    assert blocked.shape == (spec.n_mels, n_frames) and blocked.dtype == np.float32
    # It was equal to the last bit on the AVX-512 machines of earlier sessions; on an AVX2-only
    # EPYC the BLAS kernel of a block's tail columns rounds differently (2.4e-7 at most seen,
    # about 1 ulp). A misplaced block would differ far more.
    np.testing.assert_allclose(blocked, whole, rtol=5e-7, atol=0)
