"""Long audio decoded window after window, each window starting where the last complete
segment of the one before ended (OpenAI Whisper's `seek`: `transcribe` in
whisper/transcribe.py, `generate_segments` in faster-whisper's transcribe.py).

Consecutive 30 s windows cut speech wherever the 30 s fall, and Whisper tends to drop a
word or utterance cut in two. Decoded with timestamps, a window says where its last complete
segment ends, and the next window starts there, so a segment that runs past the window is
decoded again, whole, at the start of the next. OpenAI's rule (`complete_segments`):

- the tokens end with a single timestamp (`... text <|t|>`): no speech after t, every
  segment is complete, the next window starts at this window's end;
- else, when some segment ended and the next began (a timestamp pair `<|t|><|t'|>`): the
  text after the last pair is dropped and the next window starts at its first timestamp t;
- else (no pair): the window's tokens are kept whole, the next window starts at its end.

Windows are cut at any frame from the recording's log-mel features and zero-padded, as
OpenAI's decoder does (`recording_features`, `window_at`). Unlike OpenAI's and
faster-whisper's, the segments are parsed by `segments.segments_from_tokens`, so a window
whose tokens hold no pair starts its segment at its first timestamp, not at the window's
start. Each recording is sequential; `seek_decode` steps several recordings together, one
window of each per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .decoding import Decoded, Quality
from .features import LogMelSpec, whisper_windows

__all__ = ["SeekWindow", "complete_segments", "recording_features", "seek_decode",
           "window_at"]


def complete_segments(ids: Sequence[int], timestamp_begin: int, frames: int,
                      frames_per_timestamp: int,
                      speech_after: Callable[[int], bool] | None = None) -> tuple[int, int]:
    """(how many of `ids` to keep, frames to move the seek by) for one window's generated
    tokens (prompt and eot removed) holding `frames` frames of audio (module docstring).

    `speech_after(frame)`: whether speech is known to follow that frame of the window (a
    VAD's regions). Then a window whose tokens end with a single timestamp t but leave
    speech after t moves the seek to t, not to its end: Whisper often ends a window's
    tokens one utterance early, leaving it to the next window, which OpenAI's rule would
    start after it (BENCHMARKS.md, issue 14: whole utterances lost at VAD window ends).
    Tokens that end with a pair (a segment's end, and a start with no text after it) and
    leave no speech after it take the whole window: there is nothing left to decode."""
    stamp = [t >= timestamp_begin for t in ids]
    single_ending = len(ids) >= 2 and stamp[-1] and not stamp[-2]
    pairs = [i for i in range(1, len(ids)) if stamp[i] and stamp[i - 1]]
    if single_ending and speech_after is not None:
        end = (ids[-1] - timestamp_begin) * frames_per_timestamp
        if 0 < end < frames and speech_after(end):
            return len(ids), end
    if single_ending or not pairs:
        return len(ids), frames
    last = pairs[-1]  # ids[last - 1] ends the last complete segment
    advance = (ids[last - 1] - timestamp_begin) * frames_per_timestamp
    if last == len(ids) - 1 and speech_after is not None and not speech_after(advance):
        return last, frames  # an empty last segment, and no speech left to decode
    # A segment ending at 0 s would restart the window where it began, for ever; the
    # timestamp rules never emit one (an end passes its start), a faulty decoder might.
    return (last, advance) if advance > 0 else (len(ids), frames)


def recording_features(audio: np.ndarray, spec: LogMelSpec) -> np.ndarray:
    """Log-mel features of a whole recording, float32 [n_mels, content frames]: the windows
    of `whisper_windows` side by side without their padding, so a window cut at frame 0 is
    exactly the fixed path's first window."""
    windows = whisper_windows(audio, spec)
    return np.concatenate(list(windows), axis=1)[:, : len(audio) // spec.hop_length]


def window_at(features: np.ndarray, seek: int, n_frames: int) -> tuple[np.ndarray, int]:
    """The window [n_mels, n_frames] that starts at frame `seek` of `features`, zero-padded
    past their end, and how many of its frames are audio."""
    size = min(n_frames, features.shape[1] - seek)
    out = np.zeros((features.shape[0], n_frames), np.float32)
    out[:, :size] = features[:, seek : seek + size]
    return out, size


@dataclass(frozen=True)
class SeekWindow:
    """One decoded window of a recording: its first frame, its frames of audio, the ids of
    its complete segments, whether the loop guard ended its decoding, and how its decoding
    went (beam search or temperature fallback; None: greedy)."""

    start: int
    frames: int
    ids: tuple[int, ...]
    looped: bool
    quality: Quality | None = None


def _after(speech_after: Callable[[int, int], bool], r: int, seek: int,
           size: int) -> Callable[[int], bool]:
    """Whether speech follows a frame of recording r's window at `seek` of `size` frames:
    only inside its audio."""
    return lambda frame: 0 < frame < size and speech_after(r, seek + frame)


def seek_decode(features: Sequence[np.ndarray],
                decode: Callable[[np.ndarray, list[int], list[Callable[[int], bool] | None]],
                                 Decoded],
                n_frames: int, timestamp_begin: int, batch: int,
                frames_per_timestamp: int,
                speech_after: Callable[[int, int], bool] | None = None,
                ) -> list[list[SeekWindow]]:
    """Each recording's windows, decoded from frame 0 until the seek passes its features.

    `decode(windows, rows, afters)` turns windows [B, n_mels, n_frames], window b of
    recording `rows[b]`, into their generated ids with timestamps; `afters[b]` (None
    without `speech_after`) tells whether speech follows a frame of window b's audio.
    `speech_after(r, frame)`: whether speech follows that frame of recording r
    (`complete_segments`).
    Every call takes the next window of at most `batch` unfinished recordings (the first
    ones, in order); where a recording's next window starts depends only on its own
    tokens, so its windows are those it gets alone.
    """
    seeks = [0] * len(features)
    out: list[list[SeekWindow]] = [[] for _ in features]
    while True:
        rows = [r for r, f in enumerate(features) if seeks[r] < f.shape[1]][:batch]
        if not rows:
            return out
        cut = [window_at(features[r], seeks[r], n_frames) for r in rows]
        afters = [None if speech_after is None else _after(speech_after, r, seeks[r], size)
                  for r, (_, size) in zip(rows, cut, strict=True)]
        dec = decode(np.stack([w for w, _ in cut]), rows, afters)
        qualities: list[Quality | None] = [*dec.quality] if dec.quality else [None] * len(rows)
        for (_, size), r, after, ids, looped, quality in zip(
                cut, rows, afters, dec.ids, dec.looped, qualities, strict=True):
            keep, advance = complete_segments(ids, timestamp_begin, size,
                                              frames_per_timestamp, after)
            out[r].append(SeekWindow(seeks[r], size, tuple(ids[:keep]), looped, quality))
            seeks[r] += advance
