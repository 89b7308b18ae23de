"""Voice activity detection for long audio: Silero VAD through ONNX Runtime, in numpy.

Long recordings are decoded as windows of at most 30 s around their speech: Silero VAD
scores every 32 ms chunk, `speech_regions` turns the scores into speech regions exactly as
the `silero-vad` package's `get_speech_timestamps` does (threshold, neg threshold, min
speech / min silence durations, speech padding; `silero_vad/utils_vad.py`, version 6.2),
and `plan_windows` merges consecutive regions greedily into windows of at most 30 s of
the recording, cut only in pauses (a region longer than a window is split where it is
least likely speech). Long silences between windows are never decoded; a window is one
stretch of the recording, so `segments.window_clock` places its segments. The graph runs
cut in two (`silero_graph`): a recording takes two ORT calls per block of chunks.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import google.protobuf.message
import numpy as np
import onnx

from ..errors import SfcError
from .audio import SAMPLE_RATE
from .session import open_session
from .silero_graph import HIDDEN, split_silero

__all__ = ["CHUNK", "CONTEXT", "Region", "SileroVad", "VadParams",
           "plan_windows", "silero_model_path", "speech_in", "speech_regions"]

# Silero VAD at 16 kHz scores 512-sample chunks, each fed after the previous chunk's last
# 64 samples: on 512 samples alone the graph scores everything as silence.
CHUNK = 512
CONTEXT = 64
BLOCK = 1024  # chunks per pair of calls: 33 s of audio, 2.4 MB of encoder input
_MODEL = ("data", "silero_vad_16k_op15.onnx")


@dataclass(frozen=True)
class VadParams:
    """`get_speech_timestamps`' defaults (durations in ms); `neg_threshold` None is the
    package's threshold - 0.15 (at least 0.01)."""

    threshold: float = 0.5
    neg_threshold: float | None = None
    min_speech_ms: int = 250
    min_silence_ms: int = 100
    speech_pad_ms: int = 30

    def negative(self) -> float:
        """The probability below which speech is over."""
        return self.neg_threshold if self.neg_threshold is not None else max(
            self.threshold - 0.15, 0.01)


@dataclass(frozen=True)
class Region:
    """Samples [start, end) of the recording."""

    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


def speech_regions(probs: np.ndarray, n_samples: int, params: VadParams = VadParams(),
                   rate: int = SAMPLE_RATE) -> list[Region]:
    """Speech regions of a recording of `n_samples` from its chunk probabilities.

    `get_speech_timestamps_from_probs` of silero-vad 6.2 with max_speech_duration_s
    infinite (windows are split later, where `plan_windows` chooses): speech starts at a
    chunk >= threshold, ends at the first chunk < neg threshold of a silence lasting at
    least min_silence; regions shorter than min_speech are dropped; then each is padded by
    speech_pad, halving the pause instead where two would overlap.
    """
    min_speech = rate * params.min_speech_ms / 1000
    min_silence = rate * params.min_silence_ms / 1000
    negative = params.negative()
    found: list[list[int]] = []
    start: int | None = None
    silence_from = 0  # the package's temp_end: where a tolerated silence began (0: none)
    for i, p in enumerate(probs):
        at = CHUNK * i
        if p >= params.threshold:
            silence_from = 0
            if start is None:
                start = at
                continue
        if start is not None and p < negative:
            silence_from = silence_from or at
            if at - silence_from >= min_silence:
                if silence_from - start > min_speech:
                    found.append([start, silence_from])
                start, silence_from = None, 0
    if start is not None and n_samples - start > min_speech:
        found.append([start, n_samples])
    return _padded(found, int(rate * params.speech_pad_ms / 1000), n_samples)


def _padded(found: list[list[int]], pad: int, n_samples: int) -> list[Region]:
    """`found` [start, end] pairs widened by `pad` each side, or by half the pause between
    two regions closer than 2 * pad (the package's last loop)."""
    for i, speech in enumerate(found):
        if i == 0:
            speech[0] = max(0, speech[0] - pad)
        if i == len(found) - 1:
            speech[1] = min(n_samples, speech[1] + pad)
            continue
        pause = found[i + 1][0] - speech[1]
        widen = pause // 2 if pause < 2 * pad else pad
        speech[1] = min(n_samples, speech[1] + widen)
        found[i + 1][0] = max(0, found[i + 1][0] - widen)
    return [Region(s, e) for s, e in found]


def _split_long(region: Region, probs: np.ndarray, most: int) -> list[Region]:
    """`region` in pieces of at most `most` samples, each cut at the chunk of least speech
    probability in the second half of the stretch a window can hold (at `most` when that
    holds no chunk), so pieces are never shorter than half a window but the last."""
    out = []
    while len(region) > most:
        lo = -(-(region.start + most // 2) // CHUNK)
        hi = min((region.start + most) // CHUNK, len(probs))
        cut = region.start + most
        if lo < hi:
            cut = CHUNK * (lo + int(np.argmin(probs[lo:hi])))
        out.append(Region(region.start, cut))
        region = Region(cut, region.end)
    return [*out, region]


def plan_windows(regions: Sequence[Region], probs: np.ndarray,
                 most: int = 30 * SAMPLE_RATE) -> list[Region]:
    """Decoding windows: stretches of the recording of at most `most` samples, each from
    a region's start to a later region's end, consecutive regions merged greedily; a
    region longer than that is split first (`_split_long`).

    A window keeps the pauses inside it, as faster-whisper's batched pipeline and
    whisperX do: joining the regions alone moved Whisper's segment ends, which fall a
    little after the speech, across the cut into the next region's time.
    """
    windows: list[Region] = []
    current: Region | None = None
    for piece in (p for r in regions for p in _split_long(r, probs, most)):
        if current is not None and piece.end - current.start <= most:
            current = Region(current.start, piece.end)
            continue
        if current is not None:
            windows.append(current)
        current = piece
    return windows if current is None else [*windows, current]


def speech_in(window: Region, regions: Sequence[Region]) -> list[Region]:
    """The parts of `regions` inside `window`, in the window's samples (a region longer
    than a window is split across windows by `plan_windows`, so one may begin inside)."""
    return [Region(max(g.start, window.start) - window.start,
                   min(g.end, window.end) - window.start)
            for g in regions if g.start < window.end and g.end > window.start]


def silero_model_path() -> Path:
    """Silero VAD's 16 kHz ONNX graph from the `silero-vad` package, found without
    importing it (its `__init__` imports torch; the runtime must not)."""
    spec = importlib.util.find_spec("silero_vad")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder).joinpath(*_MODEL)
        if path.is_file():
            return path
    raise SfcError("--vad needs Silero VAD's ONNX model: pip install silero-vad")


@dataclass
class SileroVad:
    """Silero VAD's two sessions (`silero_graph.split_silero`: per-chunk encoder, LSTM over
    the chunks), its parameters and the longest window (samples)."""

    encoder: Any
    recurrent: Any
    params: VadParams = field(default_factory=VadParams)
    most: int = 30 * SAMPLE_RATE

    @classmethod
    def open(cls, path: Path | None = None, params: VadParams | None = None,
             threads: int | None = None) -> SileroVad:
        """Sessions of `path`'s graph (by default the package's), cut in two: the encoder on
        `threads` (None: ORT's default, one per core; its idle threads do not spin, since
        the Whisper sessions run next), the LSTM on one."""
        path = path or silero_model_path()
        try:
            model = onnx.load(str(path))
        except (OSError, google.protobuf.message.DecodeError) as exc:
            raise SfcError(f"cannot read Silero VAD's graph {path}: {exc}") from None
        encoder, recurrent = split_silero(model)
        return cls(open_session(encoder.SerializeToString(), threads=threads, spinning=False),
                   open_session(recurrent.SerializeToString(), threads=1),
                   params or VadParams())

    def probabilities(self, audio: np.ndarray) -> np.ndarray:
        """Speech probability of each 512-sample chunk of 16 kHz `audio` (the last one
        zero-padded), as `OnnxWrapper.__call__` computes them up to float rounding: each
        chunk after the previous one's last 64 samples, the recurrent state carried over.
        """
        n = -(-len(audio) // CHUNK)
        if n == 0:
            return np.empty(0, np.float32)
        padded = np.zeros(CONTEXT + n * CHUNK, np.float32)
        padded[CONTEXT:CONTEXT + len(audio)] = audio
        frames = np.lib.stride_tricks.sliding_window_view(padded, CHUNK + CONTEXT)[::CHUNK]
        h = c = np.zeros((1, 1, HIDDEN), np.float32)
        out = np.empty(n, np.float32)
        for first in range(0, n, BLOCK):
            block = np.ascontiguousarray(frames[first:first + BLOCK])
            (encoded,) = self.encoder.run(None, {"input": block})  # [chunks, HIDDEN, 1]
            out[first:first + len(block)], h, c = self.recurrent.run(
                None, {"x": encoded.reshape(-1, 1, HIDDEN), "h0": h, "c0": c})
        return out

    def windows(self, audio: np.ndarray) -> list[Region]:
        """The decoding windows of 16 kHz `audio` (none when nothing is speech)."""
        return self.plan(audio)[0]

    def plan(self, audio: np.ndarray) -> tuple[list[Region], list[Region]]:
        """(decoding windows, speech regions) of 16 kHz `audio`."""
        probs = self.probabilities(audio)
        regions = speech_regions(probs, len(audio), self.params)
        return plan_windows(regions, probs, self.most), regions
