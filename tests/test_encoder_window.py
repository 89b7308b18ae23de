"""The encoder's window for short recordings (`--encoder-window`, `runtime.window`): the
sizes it picks, its parsing, the runtime's use of it, and where it is refused."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sfc.card import GraphSpec, TensorSpec
from sfc.errors import SfcError
from sfc.runtime.audio import load_audio
from sfc.runtime.features import LogMelSpec
from sfc.runtime.whisper import WhisperRuntime, _check_short_windows
from sfc.runtime.window import FULL, EncoderWindow
from tests.conftest import EVAL_DATA

SPEC = LogMelSpec()
RATE = SPEC.sample_rate


def test_parse_names_the_three_forms() -> None:
    assert EncoderWindow.parse("full") == FULL and not FULL.fit
    assert EncoderWindow.parse("fit") == EncoderWindow(fit=True)
    assert EncoderWindow.parse("fit:pad=3.5") == EncoderWindow(fit=True, pad_s=3.5)
    assert EncoderWindow.parse("fit: min=4 ,pad=1") == EncoderWindow(fit=True, pad_s=1.0,
                                                                    least_s=4.0)
    assert [str(EncoderWindow.parse(t)) for t in ("full", "fit", "fit:pad=5", "fit:min=4")] \
        == ["full", "fit", "fit:pad=5", "fit:min=4"]


@pytest.mark.parametrize("text", ["", "half", "fit:", "fit:3", "fit:pad=x", "fit:pad=-1",
                                  "fit:min=-2", "full:pad=2", "fit:pad=nan", "fit:step=2"])
def test_parse_refuses_anything_else_in_one_line(text: str) -> None:
    with pytest.raises(SfcError) as err:
        EncoderWindow.parse(text)
    assert "\n" not in str(err.value)


def test_fit_is_the_clip_plus_the_padding_rounded_up_to_whole_seconds() -> None:
    fit = EncoderWindow(fit=True, pad_s=2.0, least_s=0.0)
    assert fit.frames(4 * RATE, SPEC) == 600
    assert fit.frames(4 * RATE + 1, SPEC) == 700
    assert fit.frames(0, SPEC) == 200
    assert fit.frames(28 * RATE, SPEC) == SPEC.n_frames  # capped at the full window
    assert fit.frames(40 * RATE, SPEC) == SPEC.n_frames  # longer than a window: full
    assert FULL.frames(RATE, SPEC) == SPEC.n_frames
    shortest = EncoderWindow(fit=True, pad_s=2.0, least_s=10.0)
    assert shortest.frames(4 * RATE, SPEC) == 1000
    assert shortest.frames(9 * RATE, SPEC) == 1100


@given(samples=st.integers(0, 2 * SPEC.n_samples), pad=st.floats(0, 40),
       least=st.floats(0, 40), step=st.floats(0.01, 10))
def test_fit_windows_are_even_hold_the_clip_and_never_exceed_the_full_one(
        samples: int, pad: float, least: float, step: float) -> None:
    frames = EncoderWindow(fit=True, pad_s=pad, least_s=least,
                           step_s=step).frames(samples, SPEC)
    assert frames % 2 == 0 and 2 <= frames <= SPEC.n_frames
    if samples <= SPEC.n_samples:
        assert frames >= min(SPEC.n_frames, samples // SPEC.hop_length)


def _recording(runtime: WhisperRuntime) -> list[int]:
    """Wrap the runtime's encoder so that it records the frames of every call."""
    seen: list[int] = []
    inner = runtime.encoder

    class Recording:
        def run(self, names: Any, feed: dict[str, np.ndarray]) -> Any:
            seen.append(feed["input_features"].shape[-1])
            return inner.run(names, feed)

    runtime.encoder = Recording()
    return seen


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    return [load_audio(EVAL_DATA / "audio" / f"eval_000{i}.flac") for i in (1, 2, 3)]


def test_fit_encodes_the_clip_on_a_shorter_window(tiny_export: Path,
                                                  clips: list[np.ndarray]) -> None:
    fit = EncoderWindow(fit=True, least_s=0.0)
    runtime = WhisperRuntime.open(tiny_export, threads=1, window=fit)
    seen = _recording(runtime)
    text = runtime.transcribe(clips[0]).text
    assert seen == [fit.frames(len(clips[0]), runtime.mel)] and seen[0] < 3000
    assert text.strip()
    # Timestamps keep the full window (Whisper's timestamps are 30 s window time).
    runtime.transcribe(clips[0], timestamps=True)
    assert seen[1:] and set(seen[1:]) == {3000}


def test_a_fit_window_capped_at_30s_is_the_full_window(tiny_export: Path,
                                                       clips: list[np.ndarray]) -> None:
    full = WhisperRuntime.open(tiny_export, threads=1)
    capped = WhisperRuntime.open(tiny_export, threads=1,
                                 window=EncoderWindow(fit=True, pad_s=30.0))
    assert capped.transcribe(clips[1]).text == full.transcribe(clips[1]).text


def test_recordings_of_different_sizes_decode_as_they_do_alone(
        tiny_export: Path, clips: list[np.ndarray]) -> None:
    runtime = WhisperRuntime.open(tiny_export, threads=1,
                                  window=EncoderWindow(fit=True, least_s=0.0))
    alone = [runtime.transcribe(c).text for c in clips]
    seen = _recording(runtime)
    together = [t.text for t in runtime.transcribe_many(clips)]
    assert together == alone
    sizes = {runtime.window.frames(len(c), runtime.mel) for c in clips}
    assert sorted(set(seen), reverse=True) == sorted(sizes, reverse=True)


def _encoder(frames: int | str, path: str = "encoder.onnx") -> GraphSpec:
    return GraphSpec(path=path, inputs=(TensorSpec("input_features", "float32",
                                                   ("batch", 80, frames)),),
                     outputs=())


def test_a_static_or_engine_encoder_refuses_a_shorter_window() -> None:
    _check_short_windows(Path("m"), _encoder("frames"))  # format 3: accepted
    with pytest.raises(SfcError, match="takes 3000 frames only"):
        _check_short_windows(Path("m"), _encoder(3000))
    with pytest.raises(SfcError, match="TensorRT engine"):
        _check_short_windows(Path("m"), _encoder("frames", "encoder.plan"))


def test_tensorrt_profiles_keep_the_full_window(tiny_export: Path) -> None:
    from sfc.card import ModelCard
    from sfc.targets.tensorrt_plan import ProfileLimits, profiles_for

    card = ModelCard.load(tiny_export)
    (enc,) = profiles_for(card, "encoder", ProfileLimits())
    assert enc.min == enc.opt == enc.max == (1, 80, 3000)
    cross = {p.name: p for p in profiles_for(card, "decoder", ProfileLimits())}["cross_key_0"]
    assert cross.min[2] == cross.max[2] == 1500


@pytest.mark.parametrize("extra", [["half"], ["fit", "-f", "srt"], ["fit", "--vad"]])
def test_cli_refuses_a_bad_window_in_one_line(tiny_export: Path, extra: list[str]) -> None:
    """A window it cannot parse, or fit where it never applies (timestamps, VAD windows)."""
    clip = EVAL_DATA / "audio" / "eval_0001.flac"
    out = subprocess.run(["sfc", "transcribe", str(tiny_export), str(clip),
                          "--encoder-window", *extra], capture_output=True, text=True,
                         check=False)
    assert out.returncode != 0 and out.stdout == ""
    assert out.stderr.strip().count("\n") == 0 and "--encoder-window" in out.stderr
