"""Timed segments from Whisper's timestamp tokens, and their times in the recording.

A window decoded with timestamps reads `<|0.00|> text <|3.20|><|3.80|> text <|7.40|>`:
each segment opens and closes with a timestamp (`TIME_PRECISION` seconds per step, counted
from the window's start). `segments_from_tokens` turns one window's tokens into segments
in window time; `map_times` moves them into the recording's time through any clock, so the
fixed and seek windows (`window_clock`: a window is one stretch of the recording) and
windows made of several cuts of it share the parsing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from .decoding import TIME_PRECISION, Quality

__all__ = ["Segment", "map_times", "segments_from_tokens", "window_clock"]


@dataclass(frozen=True)
class Segment:
    """A stretch of speech: start and end in seconds, its text, its token ids (the
    timestamp tokens that bound it included, as the decoder emitted them), and how its
    window's decoding went (beam search or temperature fallback; None: greedy)."""

    start: float
    end: float
    text: str
    tokens: tuple[int, ...]
    quality: Quality | None = None


def segments_from_tokens(ids: Sequence[int], timestamp_begin: int, window_s: float,
                         decode: Callable[[list[int]], str],
                         quality: Quality | None = None) -> list[Segment]:
    """The segments of one window's generated tokens (prompt and eot removed), in window time.

    A segment runs from a timestamp over text tokens to the next timestamp. Text still open
    when the tokens end (the window's speech runs past its end, or the loop guard or the
    length limit stopped it) ends at `window_s`; text before any timestamp starts at 0.
    `decode` turns text token ids into text; segments whose text is blank are dropped.
    Every segment gets the window's `quality`.
    """
    out: list[Segment] = []
    start, first, text = 0.0, 0, []  # the open segment: start time, first token, text ids
    for i, token in enumerate(ids):
        if token < timestamp_begin:
            text.append(token)
            continue
        time = (token - timestamp_begin) * TIME_PRECISION
        if text:  # this timestamp ends the open segment
            out.append(Segment(start, time, decode(text).strip(), tuple(ids[first:i + 1]),
                               quality))
            text, first = [], i + 1
        else:  # it starts one (or moves the start of one with no text yet)
            first = i
        start = time
    if text:
        out.append(Segment(start, window_s, decode(text).strip(), tuple(ids[first:]),
                           quality))
    return [s for s in out if s.text]


def window_clock(offset: float, duration: float) -> Callable[[float], float]:
    """Window time to recording time for a window that is the stretch of the recording
    starting at `offset` seconds and holding `duration` seconds of it: times past the
    audio's end (a last window's zero padding) are clamped to it."""
    return lambda t: offset + min(max(t, 0.0), duration)


def map_times(segments: Sequence[Segment], clock: Callable[[float], float]) -> list[Segment]:
    """`segments` with their times mapped by `clock` (rounded to the millisecond, the
    finest unit the output formats carry)."""
    return [replace(s, start=round(clock(s.start), 3), end=round(clock(s.end), 3))
            for s in segments]
