"""An evaluation's utterances as executor tasks (`sfc eval --workers N`, `--ray-address`).

Each worker opens the runtime once from a picklable `TranscriberSpec` and transcribes the
utterances it is handed; the driver scores them in manifest order. The transcripts are the
in-process ones (the same greedy or seeded decoding of the same graphs); the per-utterance
compute seconds are each worker's, at its share of the threads.

In one process, `Batched` transcribes them N at a time through the runtime's
`transcribe_many` (`sfc eval --batch N`, throughput mode).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .manifest import Utterance

if TYPE_CHECKING:
    import numpy as np

    from ..runtime.whisper import Transcript

__all__ = ["Batched", "Transcribed", "TranscriberSpec", "transcribe_batch", "transcribe_one"]

SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class Transcribed:
    """One utterance's transcript, its audio length and its transcription seconds."""

    text: str
    audio_s: float
    compute_s: float
    loop_stops: int = 0


ManyTranscriber = Callable[[list["np.ndarray"]], Sequence["Transcript | str"]]


def transcribe_batch(transcribe_many: ManyTranscriber,
                     utts: Sequence[Utterance]) -> list[Transcribed]:
    """Load the audio of `utts` and run `transcribe_many` on it all at once; only the
    transcription is timed (audio decoding is I/O that a deployed system does
    differently). Each utterance is given the batch's seconds in proportion to its audio
    seconds, so the total compute over the total audio stays the batch's RTF."""
    # Lazy: soundfile/scipy are not needed to read or render results.
    from ..runtime.audio import load_audio

    audios = [load_audio(u.audio) for u in utts]
    start = time.perf_counter()
    outs = transcribe_many(audios)
    compute_s = time.perf_counter() - start
    seconds = [len(a) / SAMPLE_RATE for a in audios]
    total = sum(seconds)
    # Silent (empty) audio everywhere: nothing to be proportional to, so an even split.
    shares = [s / total if total else 1 / len(utts) for s in seconds]
    return [Transcribed(out, s, compute_s * share) if isinstance(out, str)
            else Transcribed(out.text, s, compute_s * share, out.loop_stops)
            for out, s, share in zip(outs, seconds, shares, strict=True)]


def transcribe_one(transcribe: Any, utt: Utterance) -> Transcribed:
    """`transcribe_batch` of one utterance through a one-recording `transcribe`."""
    return transcribe_batch(lambda audios: [transcribe(audios[0])], [utt])[0]


class Batched:
    """An executor (`executor.Executor`) that transcribes utterances `size` at a time
    through `transcribe_many` in this process, yielding each batch's results as it
    finishes, in input order: the progress bar advances per batch, and a Ctrl-C keeps the
    batches done."""

    def __init__(self, transcribe_many: ManyTranscriber, size: int) -> None:
        if size < 1:
            raise ValueError(f"batch size must be at least 1, not {size}")
        self.transcribe_many = transcribe_many
        self.size = size

    def evaluate(self, tasks: Sequence[Utterance]) -> Iterator[Transcribed]:
        for first in range(0, len(tasks), self.size):
            yield from transcribe_batch(self.transcribe_many, tasks[first:first + self.size])

    def close(self) -> None:
        """Nothing to release: the runtime belongs to the caller."""


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
