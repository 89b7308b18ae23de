"""Voice activity detection for long audio: speech regions from Silero VAD's probabilities
(against the silero-vad package's own), windows of at most 30 s cut at pauses, times
mapped back through the cuts, Whisper decoding those windows in batches, and
`sfc transcribe --vad` through the installed command."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sfc.errors import SfcError
from sfc.eval import read_manifest
from sfc.runtime import vad as vad_module
from sfc.runtime.audio import SAMPLE_RATE, load_audio
from sfc.runtime.session import open_session
from sfc.runtime.vad import (
    CHUNK,
    CONTEXT,
    Region,
    SileroVad,
    VadParams,
    plan_windows,
    silero_model_path,
    speech_in,
    speech_regions,
)
from sfc.runtime.whisper import WhisperRuntime
from tests.conftest import EVAL_DATA

NO_PAD = VadParams(speech_pad_ms=0)


def _probs(*runs: tuple[float, int]) -> np.ndarray:
    """Chunk probabilities: (value, chunks) runs, in order."""
    return np.concatenate([np.full(n, v, np.float32) for v, n in runs])


# ------------------------------------------------------------------------- speech regions

def test_regions_start_at_threshold_and_end_where_a_long_enough_silence_began() -> None:
    # 20 chunks of speech; a 2-chunk dip (64 ms < 100 ms min silence) is tolerated, a
    # 10-chunk one (320 ms) ends the region where it began.
    probs = _probs((0.0, 5), (0.9, 20), (0.1, 2), (0.9, 20), (0.1, 10), (0.9, 20), (0.0, 5))
    regions = speech_regions(probs, len(probs) * CHUNK, NO_PAD)
    assert regions == [Region(5 * CHUNK, 47 * CHUNK), Region(57 * CHUNK, 77 * CHUNK)]


def test_regions_between_thresholds_continue_and_short_ones_are_dropped() -> None:
    # 0.4 is under the threshold but over the neg threshold (0.35): speech goes on; a
    # 5-chunk burst (160 ms < 250 ms min speech) is no region.
    probs = _probs((0.9, 10), (0.4, 30), (0.0, 10), (0.9, 5), (0.0, 10))
    regions = speech_regions(probs, len(probs) * CHUNK, NO_PAD)
    assert regions == [Region(0, 40 * CHUNK)]


def test_padding_widens_regions_and_halves_short_pauses() -> None:
    probs = _probs((0.0, 10), (0.9, 20), (0.0, 4), (0.9, 20), (0.0, 40), (0.9, 20))
    n = len(probs) * CHUNK - 100  # the audio ends inside the last chunk
    regions = speech_regions(probs, n, VadParams(min_silence_ms=50))
    pad = 480  # 30 ms
    # The 4-chunk pause (2048 samples) is more than 2 pads: both sides padded by one.
    # The region running to the end of the audio ends there, not past it.
    assert regions == [Region(10 * CHUNK - pad, 30 * CHUNK + pad),
                       Region(34 * CHUNK - pad, 54 * CHUNK + pad),
                       Region(94 * CHUNK - pad, n)]
    close = speech_regions(probs, n, VadParams(min_silence_ms=50, speech_pad_ms=100))
    assert close[0].end == close[1].start == 32 * CHUNK  # 4096 < 2 pads: split in half


# ------------------------------------------------------------------------------- windows

def test_regions_merge_greedily_into_windows_cut_only_in_pauses() -> None:
    # A window runs from a region's start to a later one's end, pauses inside included:
    # 0-100 fills one exactly; a region ending one sample later starts the next.
    regions = [Region(0, 40), Region(50, 80), Region(90, 100), Region(200, 260)]
    assert plan_windows(regions, np.zeros(1), most=100) == [Region(0, 100), Region(200, 260)]
    longer = [*regions[:2], Region(90, 101), regions[3]]
    assert plan_windows(longer, np.zeros(1), most=100) == [Region(0, 80), Region(90, 101),
                                                           Region(200, 260)]
    assert plan_windows([], np.zeros(1)) == []


def test_speech_in_a_window_includes_a_region_split_across_windows() -> None:
    regions = [Region(0, 50), Region(60, 250)]  # the second longer than a window of 100
    windows = plan_windows(regions, np.zeros(1), most=100)
    assert windows == [Region(0, 50), Region(60, 160), Region(160, 250)]
    assert speech_in(windows[0], regions) == [Region(0, 50)]
    assert speech_in(windows[1], regions) == [Region(0, 100)]
    assert speech_in(windows[2], regions) == [Region(0, 90)]  # begins inside a region
    assert speech_in(Region(40, 70), regions) == [Region(0, 10), Region(20, 30)]


def test_a_region_longer_than_a_window_is_split_where_speech_is_least_likely() -> None:
    probs = np.full(200, 0.9, np.float32)
    probs[70] = 0.6   # in the second half of the first window: the cut
    probs[20] = 0.1   # in its first half: too early to cut
    region = Region(0, 200 * CHUNK)
    windows = plan_windows([region], probs, most=100 * CHUNK)
    assert windows[0] == Region(0, 70 * CHUNK)
    assert all(a.end == b.start for a, b in itertools.pairwise(windows))
    assert windows[-1].end == region.end and all(len(w) <= 100 * CHUNK for w in windows)


# ----------------------------------------------------------------------- Silero VAD model

@pytest.fixture(scope="module")
def detector() -> SileroVad:
    return SileroVad.open()


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    return [load_audio(u.audio) for u in read_manifest(EVAL_DATA)[:3]]


def _join(clips: list[np.ndarray], pauses_s: list[float]) -> tuple[np.ndarray, list[tuple]]:
    """Pause, clip, pause, clip, ...: the audio and each clip's (start, end) in seconds."""
    parts, places, at = [], [], 0
    for clip, pause in zip(clips, pauses_s, strict=True):
        gap = np.zeros(round(pause * SAMPLE_RATE), np.float32)
        parts += [gap, clip]
        at += len(gap)
        places.append((at / SAMPLE_RATE, (at + len(clip)) / SAMPLE_RATE))
        at += len(clip)
    return np.concatenate([*parts, np.zeros(SAMPLE_RATE, np.float32)]), places


def test_speech_regions_lie_in_the_clips_and_silence_is_not_speech(
        detector: SileroVad, clips: list[np.ndarray]) -> None:
    audio, places = _join(clips, [2.0, 3.0, 4.0])
    regions = speech_regions(detector.probabilities(audio), len(audio))
    assert regions
    for r in regions:  # every region inside one clip (the clips open and end in silence)
        assert any(lo <= r.start / SAMPLE_RATE and r.end / SAMPLE_RATE <= hi
                   for lo, hi in places), r
    for lo, hi in places:  # and every clip holds one
        assert any(lo <= r.start / SAMPLE_RATE < hi for r in regions)
    assert detector.windows(np.zeros(5 * SAMPLE_RATE, np.float32)) == []


def test_regions_equal_the_silero_vad_packages(detector: SileroVad,
                                               clips: list[np.ndarray]) -> None:
    torch = pytest.importorskip("torch")
    from silero_vad import get_speech_timestamps, load_silero_vad

    audio, _ = _join(clips, [0.3, 1.2, 0.1])
    expected = get_speech_timestamps(torch.from_numpy(audio), load_silero_vad(onnx=True))
    got = speech_regions(detector.probabilities(audio), len(audio))
    assert [(r.start, r.end) for r in got] == [(d["start"], d["end"]) for d in expected]


def _per_chunk(audio: np.ndarray) -> np.ndarray:
    """The package graph's probabilities one chunk at a time (`OnnxWrapper.__call__`)."""
    session = open_session(silero_model_path(), threads=1)
    n = -(-len(audio) // CHUNK)
    padded = np.zeros(CONTEXT + n * CHUNK, np.float32)
    padded[CONTEXT:CONTEXT + len(audio)] = audio
    state, out = np.zeros((2, 1, 128), np.float32), np.empty(n, np.float32)
    for i in range(n):
        frame = padded[None, i * CHUNK:(i + 1) * CHUNK + CONTEXT]
        prob, state = session.run(None, {"input": frame, "state": state,
                                         "sr": np.array(SAMPLE_RATE, np.int64)})
        out[i] = prob.item()
    return out


@pytest.mark.parametrize("block", [None, 7])  # one block; blocks carrying the LSTM state
def test_the_cut_graph_scores_chunks_as_the_packages_graph_does(
        detector: SileroVad, clips: list[np.ndarray], block: int | None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    if block:
        monkeypatch.setattr(vad_module, "BLOCK", block)
    audio, _ = _join(clips, [0.3, 1.2, 0.1])
    audio = audio[:len(audio) - 100]  # a last chunk that needs padding
    want = _per_chunk(audio)
    got = detector.probabilities(audio)
    assert got.shape == want.shape and want.max() > 0.9 and want.min() < 0.1
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert detector.probabilities(np.zeros(0, np.float32)).shape == (0,)


def test_a_graph_that_is_not_silero_is_a_one_line_error(tmp_path: Path) -> None:
    junk = tmp_path / "vad.onnx"
    junk.write_bytes(b"not a graph")
    with pytest.raises(SfcError, match="cannot read Silero VAD's graph"):
        SileroVad.open(junk)
    import onnx
    from onnx import TensorProto
    from onnx import helper as oh

    other = tmp_path / "other.onnx"
    x = oh.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])
    y = oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    onnx.save(oh.make_model(oh.make_graph([oh.make_node("Relu", ["input"], ["y"])], "g",
                                          [x], [y])), str(other))
    with pytest.raises(SfcError, match="not Silero VAD's 16 kHz graph"):
        SileroVad.open(other)


def test_a_missing_silero_vad_package_is_a_one_line_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vad_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SfcError, match="pip install silero-vad"):
        silero_model_path()


# ------------------------------------------------------------------------ Whisper windows

@pytest.fixture(scope="module")
def runtime(tiny_export: Path) -> WhisperRuntime:
    return WhisperRuntime.open(tiny_export, threads=1)


def test_vad_windows_drop_long_silence_and_segments_land_on_the_clips(
        runtime: WhisperRuntime, detector: SileroVad, clips: list[np.ndarray]) -> None:
    # 40 s of silence between the clips: two windows, the silence between them skipped.
    audio, places = _join(clips[:2], [1.0, 40.0])
    out = runtime.transcribe(audio, timestamps=True, vad=detector)
    windows = detector.windows(audio)
    assert len(windows) == 2 and windows[0].end / SAMPLE_RATE < places[1][0] - 30
    segs = out.segments or ()
    assert segs and all(any(lo - 0.5 <= s.start and s.end <= hi + 0.5 for lo, hi in places)
                        for s in segs), segs
    assert {i for i, (lo, hi) in enumerate(places) for s in segs if lo - 0.5 <= s.start < hi}\
        == {0, 1}
    for clip in clips[:2]:  # each clip's words are in the text
        alone = set(runtime.transcribe(clip).text.lower().split())
        assert len(alone & set(out.text.lower().split())) >= len(alone) // 2


def test_batched_vad_windows_give_the_sequential_text(
        runtime: WhisperRuntime, detector: SileroVad, clips: list[np.ndarray]) -> None:
    # Three windows of at most 6 s: decoded one at a time, then all three together.
    audio, _ = _join(clips, [0.5, 1.0, 1.0])
    small = SileroVad(detector.encoder, detector.recurrent, most=6 * SAMPLE_RATE)
    assert len(small.windows(audio)) == 3
    texts = []
    for batch in (1, 3):
        runtime.max_batch = batch
        texts.append(runtime.transcribe(audio, vad=small).text)
    runtime.max_batch = 8
    assert texts[0] == texts[1] and texts[0]


# --------------------------------------------------------------------------------- CLI

SFC = shutil.which("sfc")


def _sfc(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    assert SFC is not None, "the sfc command is not on PATH (pip install -e .)"
    return subprocess.run([SFC, *args], capture_output=True, check=False,
                          env={**os.environ, **(env or {})})


def test_cli_vad_json_times_lie_in_the_clips(tiny_export: Path, clips: list[np.ndarray],
                                            tmp_path: Path) -> None:
    audio, places = _join(clips[:2], [1.0, 40.0])
    path = tmp_path / "long.flac"
    sf.write(path, audio, SAMPLE_RATE)
    done = _sfc("transcribe", str(tiny_export), str(path), "--threads", "1", "--vad",
                "--batch-size", "2", "-f", "json")
    assert done.returncode == 0, done.stderr
    segs = json.loads(done.stdout)["segments"]
    assert segs and all(any(lo - 0.5 <= s["start"] and s["end"] <= hi + 0.5
                            for lo, hi in places) for s in segs), segs


def test_cli_vad_without_the_package_says_what_to_install(tiny_export: Path,
                                                          tmp_path: Path) -> None:
    # A silero_vad package without the model stands in for a missing one.
    (tmp_path / "silero_vad").mkdir()
    (tmp_path / "silero_vad" / "__init__.py").write_text("")
    done = _sfc("transcribe", str(tiny_export), str(tmp_path / "none.flac"), "--vad",
                env={"PYTHONPATH": str(tmp_path)})
    stderr = done.stderr.decode()
    assert done.returncode == 2 and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and "pip install silero-vad" in stderr
