"""Seek decoding of long audio (`sfc.runtime.seek`): OpenAI's rule for where the next
window starts, windows cut at any frame of the recording's features, recordings stepped
together by a scripted decoder that cuts speech at window ends as Whisper does, and the
real model on an utterance that straddles the 30 s edge."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from sfc.errors import SfcError
from sfc.eval import read_manifest
from sfc.eval.wer import count_errors
from sfc.runtime.audio import load_audio
from sfc.runtime.decoding import Decoded
from sfc.runtime.features import LogMelSpec, whisper_windows
from sfc.runtime.seek import complete_segments, recording_features, seek_decode, window_at
from sfc.runtime.vad import SileroVad
from sfc.runtime.whisper import WhisperRuntime
from tests.conftest import EVAL_DATA

TB = 1000  # timestamp_begin: TB + k is k * 0.02 s, i.e. 2k frames
STEP = 2  # frames per timestamp step


def ts(frame: int) -> int:
    """The timestamp token of an (even) frame in the window."""
    return TB + frame // STEP


# ------------------------------------------------------------------------- the seek rule

def test_a_single_timestamp_at_the_end_keeps_everything_and_moves_a_whole_window() -> None:
    ids = [ts(0), 1, 2, ts(40), ts(50), 3, ts(90)]
    assert complete_segments(ids, TB, 3000, STEP) == (len(ids), 3000)
    # A window shorter than 30 s (the recording's end) moves by its own frames.
    assert complete_segments([ts(0), 1, ts(40)], TB, 700, STEP) == (3, 700)


def test_an_unfinished_last_segment_is_dropped_and_the_next_window_starts_at_its_pair() -> None:
    ids = [ts(0), 1, ts(40), ts(50), 2, ts(90), ts(96), 3, 4]
    # The last pair is <|90|><|96|>: keep through 90's token, restart at frame 90.
    assert complete_segments(ids, TB, 3000, STEP) == (6, 90)


def test_a_pair_at_the_end_restarts_at_its_first_timestamp() -> None:
    ids = [ts(0), 1, ts(40), ts(44)]
    assert complete_segments(ids, TB, 3000, STEP) == (3, 40)


def test_without_a_pair_the_window_is_taken_whole() -> None:
    assert complete_segments([ts(20), 1, 2, 3], TB, 3000, STEP) == (4, 3000)
    assert complete_segments([ts(0)], TB, 3000, STEP) == (1, 3000)
    assert complete_segments([], TB, 3000, STEP) == (0, 3000)


def test_known_speech_after_a_single_ending_restarts_the_window_there() -> None:
    ids = [ts(0), 1, ts(40), ts(50), 2, ts(90)]
    # Speech known after frame 90 (a VAD region): the next window starts at 90.
    assert complete_segments(ids, TB, 3000, STEP, lambda f: f < 300) == (len(ids), 90)
    # None known there: OpenAI's rule, the whole window.
    assert complete_segments(ids, TB, 3000, STEP, lambda f: False) == (len(ids), 3000)
    # Only a single ending is continued; an unfinished segment keeps its pair's rule.
    assert complete_segments([*ids[:-1], 3], TB, 3000, STEP, lambda f: True) == (3, 40)
    # An ending at the window's end (or at 0) moves the whole window.
    assert complete_segments([ts(0), 1, ts(100)], TB, 100, STEP, lambda f: True) == (3, 100)


def test_a_pair_at_the_end_with_no_speech_left_takes_the_whole_window() -> None:
    ids = [ts(0), 1, ts(40), ts(44)]
    # Less speech known after its end than the runtime's tail: the window is done.
    assert complete_segments(ids, TB, 3000, STEP, lambda f: False) == (3, 3000)
    assert complete_segments(ids, TB, 3000, STEP, lambda f: f < 300) == (3, 40)
    # A pair with text after it is an unfinished segment whatever the speech.
    assert complete_segments([*ids, 2], TB, 3000, STEP, lambda f: False) == (3, 40)


def test_a_segment_ending_at_zero_never_stalls_the_seek() -> None:
    assert complete_segments([ts(0), ts(0), 1], TB, 3000, STEP) == (3, 3000)


# ------------------------------------------------------------------- features and windows

def test_windows_cut_at_window_multiples_are_the_fixed_paths_windows() -> None:
    spec = LogMelSpec()
    audio = np.random.default_rng(0).standard_normal(16000 * 65 + 123).astype(np.float32)
    fixed = whisper_windows(audio, spec)
    feats = recording_features(audio, spec)
    assert feats.shape == (spec.n_mels, len(audio) // spec.hop_length)
    for i, expected in enumerate(fixed):
        got, size = window_at(feats, i * spec.n_frames, spec.n_frames)
        np.testing.assert_array_equal(got, expected)
        assert size == min(spec.n_frames, feats.shape[1] - i * spec.n_frames)
    # Anywhere else: the recording's frames from there, zeros past its end.
    got, size = window_at(feats, 5000, spec.n_frames)
    assert size == feats.shape[1] - 5000 < spec.n_frames
    np.testing.assert_array_equal(got[:, :size], feats[:, 5000:])
    assert not got[:, size:].any()


# --------------------------------------------------------------- a scripted Whisper decoder

WINDOW = 100  # frames per window in the scripted tests


def _recording(frames: int) -> np.ndarray:
    """Scripted features: row 0 holds each frame's index + 1 (0 is padding), row 1 the
    recording's length, which tells `Scripted` whose window it decodes."""
    feats = np.zeros((2, frames), np.float32)
    feats[0] = np.arange(1, frames + 1)
    feats[1] = frames
    return feats


class Scripted:
    """Decodes windows like Whisper: every speech span ([start, end) frames of the
    recording, text token k for the k-th span) that starts in the window gives
    `<|start|> k <|end|>`, so consecutive segments' timestamps come in pairs; a span
    running past the window's audio is left unfinished (its start and text, no end).
    Records each batch's size."""

    def __init__(self, spans: dict[int, list[tuple[int, int]]]) -> None:
        self.spans = spans  # each recording's spans, keyed by its length in frames
        self.batches: list[int] = []

    def __call__(self, windows: np.ndarray, _rows: list[int],
                 _afters: list[Callable[[int], bool] | None]) -> Decoded:
        self.batches.append(len(windows))
        return Decoded([self._row(w) for w in windows], [False] * len(windows))

    def _row(self, window: np.ndarray) -> list[int]:
        first, size = int(window[0, 0]) - 1, int(np.count_nonzero(window[0]))
        ids: list[int] = []
        for k, (start, end) in enumerate(self.spans[int(window[1, 0])]):
            if not first <= start < first + size:
                continue
            ids += [ts(start - first), k]
            if end > first + size:
                return ids  # unfinished: runs past the window
            ids.append(ts(end - first))
        return ids


SPANS = [(4, 30), (40, 90), (96, 150), (160, 210), (230, 262)]  # in a 270-frame recording


def test_every_span_is_decoded_once_whole_although_spans_straddle_window_ends() -> None:
    decoder = Scripted({270: SPANS})
    (windows,) = seek_decode([_recording(270)], decoder, WINDOW, TB, 8, STEP)
    texts, starts = [], []
    for w in windows:
        for i, t in enumerate(w.ids):
            if t < TB:  # a text token, after its segment's start timestamp
                texts.append(t)
                starts.append(w.start + (w.ids[i - 1] - TB) * STEP)
    assert texts == list(range(len(SPANS)))
    assert starts == [s for s, _ in SPANS]
    # Windows restart at the end of the last complete segment: 90 (96-150 runs past 100),
    # then 150 (160-210 runs past 190), then 210 (230-262 fits, the recording ends at 270).
    assert [w.start for w in windows] == [0, 90, 150, 210]
    assert [w.frames for w in windows] == [100, 100, 100, 60]
    # Consecutive fixed windows would have cut two spans.
    assert sum(s < k * WINDOW < e for s, e in SPANS for k in (1, 2)) == 2


def test_recordings_stepped_together_get_the_windows_they_get_alone() -> None:
    scripts = {270: SPANS, 130: [(10, 70), (80, 120)], 40: [(2, 36)]}
    feats = [_recording(n) for n in scripts]
    alone = [seek_decode([f], Scripted(scripts), WINDOW, TB, 1, STEP)[0] for f in feats]
    decoder = Scripted(scripts)
    together = seek_decode(feats, decoder, WINDOW, TB, 2, STEP)
    assert together == alone
    assert max(decoder.batches) == 2 and sum(decoder.batches) == sum(map(len, alone))
    assert seek_decode([], decoder, WINDOW, TB, 2, STEP) == []


def test_an_utterance_left_out_before_known_speech_is_decoded_in_a_window_of_its_own() -> None:
    # A decoder that ends each window after its first span, like Whisper leaving the last
    # utterance of a window for the next one.
    class FirstOnly(Scripted):
        def _row(self, window: np.ndarray) -> list[int]:
            ids = super()._row(window)
            return ids[:3] if len(ids) >= 3 and ids[2] >= TB else ids

    spans = [(4, 30), (40, 90)]
    decoder = FirstOnly({100: spans})
    (plain,) = seek_decode([_recording(100)], decoder, WINDOW, TB, 8, STEP)
    assert [w.start for w in plain] == [0]  # OpenAI's rule: 40-90 is lost
    (known,) = seek_decode([_recording(100)], decoder, WINDOW, TB, 8, STEP,
                           lambda r, frame: any(e > frame for _, e in spans))
    assert [w.start for w in known] == [0, 30]
    assert [t for w in known for t in w.ids if t < TB] == [0, 1]  # both spans' text


def test_the_decoder_is_told_the_speech_after_each_frame_of_each_window() -> None:
    # Recording 0's speech runs to frame 150, recording 1's to 30; windows start where
    # the scripted tokens' last complete segment ended.
    ends = {0: 150, 1: 30}
    seen: list[list[tuple[int, list[bool]]]] = []

    class Telling(Scripted):
        def __call__(self, windows: np.ndarray, rows: list[int],
                     afters: list[Callable[[int], bool] | None]) -> Decoded:
            seen.append([(r, [bool(a(f)) for f in (0, 10, 60, 99, 100)])
                         for r, a in zip(rows, afters, strict=True) if a is not None])
            return super().__call__(windows, rows, afters)

    decoder = Telling({270: SPANS, 40: [(2, 36)]})
    seek_decode([_recording(270), _recording(40)], decoder, WINDOW, TB, 2, STEP,
                lambda r, frame: frame < ends[r])
    # Frame 0 and frames past a window's audio never count; the rest, from the seek on.
    assert seen[0] == [(0, [False, True, True, True, False]),
                       (1, [False, True, False, False, False])]
    assert seen[1] == [(0, [False, True, False, False, False])]  # the window at frame 90
    assert [len(a) for a in seen] == [2, 1, 1, 1]
    assert seek_decode([_recording(40)], decoder, WINDOW, TB, 1, STEP)[0]  # no predicate
    assert seen[-1] == []  # every predicate None


# ----------------------------------------------------------------------- the real model

@pytest.fixture(scope="module")
def straddling() -> tuple[np.ndarray, str]:
    """The first 7 eval clips joined by 1 s pauses (34.6 s): the 7th runs from 28.1 s to
    34.6 s, across the first window's end; and the references joined."""
    utts = read_manifest(EVAL_DATA)[:7]
    pause = np.zeros(16000, np.float32)
    audio = np.concatenate([x for u in utts for x in (load_audio(u.audio), pause)])
    return audio, " ".join(u.text for u in utts)


def test_an_utterance_across_the_window_end_is_decoded_whole(
        tiny_runtime: WhisperRuntime, straddling: tuple[np.ndarray, str]) -> None:
    audio, reference = straddling
    seek = tiny_runtime.transcribe(audio, timestamps=True)
    fixed = tiny_runtime.transcribe(audio, timestamps=True, seek=False)
    assert seek.segments is not None and fixed.segments is not None
    assert any(s.start < 30.0 < s.end for s in seek.segments)
    assert not any(s.start < 30.0 < s.end for s in fixed.segments)
    assert all(0.0 <= s.start < s.end <= len(audio) / 16000 for s in seek.segments)
    assert [s.start for s in seek.segments] == sorted(s.start for s in seek.segments)
    assert count_errors(reference, seek.text).errors < count_errors(reference, fixed.text).errors
    # Without timestamps the seek path gives the same text and no segments.
    plain = tiny_runtime.transcribe(audio, seek=True)
    assert plain.text == seek.text and plain.segments is None


def test_seek_recordings_batched_get_their_text_alone(
        tiny_runtime: WhisperRuntime, straddling: tuple[np.ndarray, str],
        shortest_clips: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    audio, _ = straddling
    recordings = [audio, load_audio(shortest_clips[0]), audio[16000 * 9:]]
    alone = [tiny_runtime.transcribe(a, timestamps=True) for a in recordings]
    monkeypatch.setattr(tiny_runtime, "max_batch", 2)  # fewer rows than recordings
    together = tiny_runtime.transcribe_many(recordings, timestamps=True)
    assert [t.text for t in together] == [t.text for t in alone]
    assert len({t.text for t in alone}) == len(recordings)


def test_seek_and_vad_windows_are_refused_together(tiny_runtime: WhisperRuntime) -> None:
    vad = SileroVad(encoder=None, recurrent=None)  # never run: the refusal comes first
    with pytest.raises(SfcError, match="choose one"):
        tiny_runtime.transcribe(np.zeros(16000, np.float32), True, vad, seek=True)


def test_by_default_only_audio_longer_than_a_window_is_decoded_by_seek(
        tiny_runtime: WhisperRuntime, straddling: tuple[np.ndarray, str],
        shortest_clips: list[Path]) -> None:
    audio, _ = straddling
    short = load_audio(shortest_clips[0])
    long_default = tiny_runtime.transcribe(audio)
    assert long_default.text == tiny_runtime.transcribe(audio, seek=True).text
    assert long_default.text != tiny_runtime.transcribe(audio, seek=False).text
    assert long_default.segments is None
    # A clip of one window keeps the decoding without timestamps, batched or not.
    alone = tiny_runtime.transcribe(short, seek=False).text
    assert tiny_runtime.transcribe(short).text == alone
    mixed = tiny_runtime.transcribe_many([audio, short])
    assert [t.text for t in mixed] == [long_default.text, alone]
