"""Spoken-language identification for multilingual Whisper, and the language each decoding
window is decoded in (pure numpy, no torch).

`detect_language` is OpenAI's `whisper.decoding.detect_language`: one decoder step on
<|startoftranscript|> over a window's encoder output, the next-token logits kept on the
language tokens only, softmax, argmax. `LanguagePlan` applies it per recording: a
recording's language is detected on its first window and its later windows follow it. The
detection reads the cross-attention K/V that decoding computes anyway, so it costs one
one-token decoder step per batch that holds a first window, not a second encoder run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..card import WhisperDecoding
from ..errors import SfcError
from .decoding import ENGLISH, DecoderStep, check_options

__all__ = ["Detected", "LanguagePlan", "detect_language", "language_probabilities",
           "window_recordings"]


@dataclass(frozen=True)
class Detected:
    """A window's most probable language and its probability among the languages."""

    language: str
    probability: float


def language_probabilities(logits: np.ndarray, spec: WhisperDecoding) -> np.ndarray:
    """Softmax over the language tokens only of next-token logits [B, vocab]:
    [B, languages], columns in the order of `spec.languages`."""
    if not spec.languages:
        raise SfcError("this model is English-only: it has no language tokens to detect")
    x = logits[:, [i for _, i in spec.languages]].astype(np.float64)
    x = np.exp(x - x.max(axis=-1, keepdims=True))
    return x / x.sum(axis=-1, keepdims=True)


def detect_language(step: DecoderStep, spec: WhisperDecoding, batch: int) -> list[Detected]:
    """The language of each of `batch` windows whose cross-attention K/V `step` binds: one
    decoder step on <|startoftranscript|> (the prompt's first token), from an empty cache."""
    shape = (spec.n_layers, batch, spec.n_heads, 0, spec.head_dim)
    tokens = np.full((batch, 1), spec.prompt[0], dtype=np.int64)
    logits, _, _ = step(tokens, np.zeros(shape, np.float32), np.zeros(shape, np.float32))
    probs = language_probabilities(logits[:, -1, :], spec)
    return [Detected(spec.languages[k][0], float(row[k]))
            for k, row in zip(probs.argmax(axis=-1), probs, strict=True)]


def window_recordings(windows_per_recording: Sequence[int]) -> list[int]:
    """The recording of each window, for windows laid out recording after recording."""
    return [r for r, count in enumerate(windows_per_recording) for _ in range(count)]


@dataclass
class LanguagePlan:
    """The language and task each batch of windows is decoded in, for one run.

    `language` (checked and spelled as the card does, `check_options`) decodes every
    window; None on a multilingual model detects a recording's language on the first
    window of it that a batch holds and decodes all its windows in that language (callers
    decode a recording's windows in order, so that is its first window); None on an
    English-only model keeps the card's prompt.
    """

    spec: WhisperDecoding
    language: str | None
    task: str = "transcribe"
    detected: dict[int, Detected] = field(default_factory=dict)  # by recording

    def __post_init__(self) -> None:
        self.language = check_options(self.spec, self.language, self.task)

    def batch(self, step: DecoderStep, recordings: Sequence[int]) -> list[str | None]:
        """The languages of a batch of windows whose decoder step is `step`, window b of
        recording `recordings[b]`; recordings not seen before are detected first (one
        decoder step over the batch)."""
        if self.language is not None or not self.spec.languages:
            return [self.language] * len(recordings)
        if any(r not in self.detected for r in recordings):
            found = detect_language(step, self.spec, len(recordings))
            for r, d in zip(recordings, found, strict=True):
                self.detected.setdefault(r, d)
        return [self.detected[r].language for r in recordings]

    def language_of(self, recording: int) -> str | None:
        """The language recording `recording` is decoded in: the given one, English on an
        English-only model, else the one detected (None while no window of it was seen)."""
        if self.language is not None:
            return self.language
        if not self.spec.languages:
            return ENGLISH
        found = self.detected.get(recording)
        return None if found is None else found.language
