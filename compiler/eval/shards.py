"""An evaluation's utterances as executor tasks (`sfc eval --workers N`, `--ray-address`).

Each worker opens the runtime once from a picklable `TranscriberSpec` and transcribes the
utterances it is handed; the driver scores them in manifest order. The transcripts are the
in-process ones (the same greedy or seeded decoding of the same graphs); the per-utterance
compute seconds are each worker's, at its share of the threads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .manifest import Utterance

__all__ = ["Transcribed", "TranscriberSpec", "transcribe_one"]

SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class Transcribed:
    """One utterance's transcript, its audio length and its transcription seconds."""

    text: str
    audio_s: float
    compute_s: float
    loop_stops: int = 0


def transcribe_one(transcribe: Any, utt: Utterance) -> Transcribed:
    """Load `utt`'s audio and run `transcribe` on it; only the transcription is timed
    (audio decoding is I/O that a deployed system does differently)."""
    # Lazy: soundfile/scipy are not needed to read or render results.
    from ..runtime.audio import load_audio

    audio = load_audio(utt.audio)
    start = time.perf_counter()
    out = transcribe(audio)
    compute_s = time.perf_counter() - start
    if isinstance(out, str):
        return Transcribed(out, len(audio) / SAMPLE_RATE, compute_s)
    return Transcribed(out.text, len(audio) / SAMPLE_RATE, compute_s, out.loop_stops)


@dataclass(frozen=True)
class TranscriberSpec:
    """What a worker opens its runtime from: the model folder and the decoding settings
    (`language`: a code, or None to detect per file)."""

    folder: Path
    guard: bool = True
    options: Any = None  # runtime.fallback.DecodeOptions; None: greedy
    language: str | None = "en"
    task: str = "transcribe"
    window: Any = None  # runtime.window.EncoderWindow; None: the full window

    def make(self, threads: int | None = None) -> Any:
        """A function utterance -> Transcribed over a runtime with `threads` threads."""
        from ..runtime.decoding import LOOP_GUARD
        from ..runtime.fallback import GREEDY
        from ..runtime.whisper import WhisperRuntime
        from ..runtime.window import FULL

        runtime = WhisperRuntime.open(self.folder, threads=threads,
                                      guard=LOOP_GUARD if self.guard else None,
                                      options=self.options or GREEDY,
                                      window=self.window or FULL)
        language, task = self.language, self.task

        def run(utt: Utterance) -> Transcribed:
            return transcribe_one(
                lambda audio: runtime.transcribe(audio, language=language, task=task), utt)

        return run
