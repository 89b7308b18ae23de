"""Transcript writers: txt, json, srt, vtt and tsv documents, as strings.

Each format is a pure function of a `Transcript`; `FORMATS` says which need the
transcript's segments, i.e. decoding with timestamps. Layouts follow OpenAI Whisper's
writers (`whisper/utils.py`): srt and vtt cues are one line each, tsv is start, end (integer
milliseconds) and text.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from .segments import Segment

if TYPE_CHECKING:
    from .whisper import Transcript

__all__ = ["FORMATS", "OutputFormat", "clock_time"]

# Line breaks or tabs in a text would end a cue, a tsv row or the txt line early.
_ONE_LINE = str.maketrans("\t\r\n", "   ")


def clock_time(seconds: float, decimal: str) -> str:
    """HH:MM:SS<decimal>mmm, as srt (',') and vtt ('.') write cue times."""
    ms = round(seconds * 1000)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{ms:03d}"


def _segments(transcript: Transcript) -> Sequence[Segment]:
    if transcript.segments is None:
        raise ValueError("this format needs segments: transcribe with timestamps")
    return transcript.segments


def _cue_text(text: str) -> str:
    # "-->" would read as a cue's timing line (OpenAI's writers make it "->" too).
    return text.translate(_ONE_LINE).replace("-->", "->")


def to_txt(transcript: Transcript) -> str:
    """The text on one line."""
    return transcript.text.translate(_ONE_LINE) + "\n"


def to_json(transcript: Transcript) -> str:
    """Text, segments (id, start, end, text, tokens) and the loop guard's stops; decoded
    other than greedily, also the decoding options (`decoding`) and each segment's
    window's temperature, avg_logprob, compression_ratio and no_speech_prob (OpenAI's keys).
    """
    segments = [{"id": i, "start": s.start, "end": s.end, "text": s.text,
                 "tokens": list(s.tokens), **(asdict(s.quality) if s.quality else {})}
                for i, s in enumerate(_segments(transcript))]
    doc: dict[str, object] = {"text": transcript.text, "segments": segments,
                              "loop_stops": transcript.loop_stops}
    if transcript.decoding is not None:
        doc["decoding"] = transcript.decoding.to_dict()
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def to_srt(transcript: Transcript) -> str:
    """SubRip: numbered cues from 1, HH:MM:SS,mmm times."""
    return "".join(
        f"{i}\n{clock_time(s.start, ',')} --> {clock_time(s.end, ',')}\n{_cue_text(s.text)}\n\n"
        for i, s in enumerate(_segments(transcript), start=1))


def to_vtt(transcript: Transcript) -> str:
    """WebVTT: a header, then cues with HH:MM:SS.mmm times; & and < are escaped, since
    cue text is markup there."""
    cues = "".join(
        f"{clock_time(s.start, '.')} --> {clock_time(s.end, '.')}\n"
        f"{_cue_text(s.text).replace('&', '&amp;').replace('<', '&lt;')}\n\n"
        for s in _segments(transcript))
    return f"WEBVTT\n\n{cues}"


def to_tsv(transcript: Transcript) -> str:
    """A header, then start, end (integer milliseconds) and text per segment."""
    return "start\tend\ttext\n" + "".join(
        f"{round(s.start * 1000)}\t{round(s.end * 1000)}\t{s.text.translate(_ONE_LINE)}\n"
        for s in _segments(transcript))


@dataclass(frozen=True)
class OutputFormat:
    """A writer, and whether it needs segments (decoding with timestamps)."""

    render: Callable[[Transcript], str]
    timestamps: bool


FORMATS: dict[str, OutputFormat] = {
    "txt": OutputFormat(to_txt, timestamps=False),
    "json": OutputFormat(to_json, timestamps=True),
    "srt": OutputFormat(to_srt, timestamps=True),
    "vtt": OutputFormat(to_vtt, timestamps=True),
    "tsv": OutputFormat(to_tsv, timestamps=True),
}
