"""Calibration clips packed into Whisper windows, for ESC's task objective.

Whisper's encoder always runs one 30 s window, and the bundled calibration clips last 3-6 s:
scored one clip per window, ESC's encoder passes spend most of their time on padding
(tiny.en's 16 ESC clips: 69 s of speech in 480 s of windows; on an AVX2-only CPU those
passes took 381 s of a 929 s default build, BENCHMARKS.md issue 13). Packed, consecutive
clips are joined with a fixed pause until a window is full: the same speech in about a fifth
of the encoder passes, teacher-forced on the FP32 model's own transcript of each packed
window. Nothing here is random: the same clips always pack the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.audio import SAMPLE_RATE, load_audio

__all__ = ["FILL_S", "GAP_S", "PackedClip", "clips_digest", "pack_clips", "packed_audio"]

# A packed window holds at most FILL_S of audio: the last clip's words stay clear of the
# window's edge, where Whisper may leave an utterance for the next window.
FILL_S = 28.0
GAP_S = 0.5  # silence between joined clips: a pause, as between sentences


@dataclass(frozen=True)
class PackedClip:
    """Consecutive calibration utterances joined into one window's audio."""

    id: str  # the parts' ids joined with "+"
    parts: tuple[str, ...]
    samples: np.ndarray = field(repr=False, compare=False)  # float32 at SAMPLE_RATE
    digest: str  # sha256 over the parts' ids and audio files' bytes, and the layout


def _digest(utterances: Sequence[Any], fill_s: float, gap_s: float) -> str:
    h = hashlib.sha256(f"{fill_s}:{gap_s}".encode())
    for u in utterances:
        h.update(u.id.encode() + b"\0" + hashlib.sha256(Path(u.audio).read_bytes()).digest())
    return h.hexdigest()


def _join(group: list[tuple[Any, np.ndarray]], fill_s: float, gap_s: float) -> PackedClip:
    gap = np.zeros(round(gap_s * SAMPLE_RATE), np.float32)
    pieces: list[np.ndarray] = []
    for i, (_, audio) in enumerate(group):
        pieces += [gap, audio] if i else [audio]
    utterances = [u for u, _ in group]
    return PackedClip("+".join(u.id for u in utterances), tuple(u.id for u in utterances),
                      np.concatenate(pieces), _digest(utterances, fill_s, gap_s))


def pack_clips(utterances: Sequence[Any], fill_s: float = FILL_S,
               gap_s: float = GAP_S) -> list[PackedClip]:
    """`utterances` (manifest entries) in order, joined greedily into clips of at most
    `fill_s` seconds with `gap_s` of silence between them; a clip longer than `fill_s`
    alone makes one (its first window is scored, as unpacked)."""
    limit = round(fill_s * SAMPLE_RATE)
    gap = round(gap_s * SAMPLE_RATE)
    packed: list[PackedClip] = []
    group: list[tuple[Any, np.ndarray]] = []
    length = 0
    for u in utterances:
        audio = load_audio(u.audio)
        if group and length + gap + len(audio) > limit:
            packed.append(_join(group, fill_s, gap_s))
            group, length = [], 0
        length += (gap if group else 0) + len(audio)
        group.append((u, audio))
    if group:
        packed.append(_join(group, fill_s, gap_s))
    return packed


def packed_audio(index: int, clip: PackedClip) -> np.ndarray:
    """A packed clip's samples: `whisper_reference`'s `audio` hook."""
    return clip.samples


def clips_digest(clips: Sequence[PackedClip]) -> str:
    """sha256 over packed clips' digests: the scored data's identity for checkpoints."""
    h = hashlib.sha256()
    for c in clips:
        h.update(c.digest.encode())
    return h.hexdigest()
