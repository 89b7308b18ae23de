"""Decoding options beyond greedy, and OpenAI Whisper's temperature fallback.

`DecodeOptions` says how windows are decoded: greedy (the default, and what an edge device
runs), beam search (`beam_size` > 1), and with `fallback` OpenAI's `decode_with_fallback`
(whisper/transcribe.py; faster-whisper's `generate_with_fallback`): a window is decoded at
temperature 0 (greedy or beam search), and while its result is too repetitive (gzip
compression ratio of its text above 2.4, or the loop guard ended it) or too improbable
(average log-probability below -1.0), again at the next temperature (0.2, 0.4, ... 1.0) by
sampling `best_of` candidates. A window whose results all fail keeps, as faster-whisper
does, the most probable of those that are not too repetitive (of all, if none is); OpenAI
keeps the last. A window is silence, and decoded to nothing, when its no-speech
probability is above 0.6 and its kept result's average log-probability not above -1.0.

Sampling draws from generators seeded by (`seed`, the window's features, the
temperature): a window's text depends on the seed and its own audio only, not on what it
is batched with.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import SfcError
from .decoding import Decoded, Quality
from .search import Searched

__all__ = ["GREEDY", "DecodeOptions", "compression_ratio", "decode_with_fallback",
           "sampling_rngs"]


@dataclass(frozen=True)
class DecodeOptions:
    """How each window is decoded (module docstring); the defaults are greedy decoding.

    `patience` and `length_penalty` are OpenAI's: beam search ends once
    round(beam_size * patience) hypotheses finished; None ranks them by summed
    log-probability / length, p by / ((5 + length) / 6) ** p.
    """

    beam_size: int = 1
    fallback: bool = False
    seed: int = 0
    patience: float = 1.0
    length_penalty: float | None = None
    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    best_of: int = 5
    compression_ratio_threshold: float = 2.4
    log_prob_threshold: float = -1.0
    no_speech_threshold: float = 0.6

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise SfcError(f"beam size must be at least 1 (1: greedy), not {self.beam_size}")
        if self.best_of < 1:
            raise SfcError(f"best_of must be at least 1, not {self.best_of}")
        if self.seed < 0:
            raise SfcError(f"seed must be a non-negative integer, not {self.seed}")
        if self.patience <= 0:
            raise SfcError(f"patience must be positive, not {self.patience}")
        if not self.temperatures or self.temperatures[0] != 0 or \
                any(t <= 0 for t in self.temperatures[1:]):
            raise SfcError("temperatures must start at 0 and go on with positive ones, "
                           f"not {self.temperatures}")

    @property
    def greedy(self) -> bool:
        """Plain greedy decoding (`decoding.greedy_decode`), with no quality measures."""
        return self.beam_size == 1 and not self.fallback

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


GREEDY = DecodeOptions()


def compression_ratio(text: str) -> float:
    """Bytes of `text` (UTF-8) over bytes of it zlib-compressed, as OpenAI computes it."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data))


def sampling_rngs(seed: int, window: np.ndarray, temperature: float,
                  count: int) -> list[np.random.Generator]:
    """`count` independent generators for sampling `window` at `temperature`."""
    key = [seed, zlib.crc32(np.ascontiguousarray(window).tobytes()), round(temperature * 1000)]
    return [np.random.default_rng(s) for s in np.random.SeedSequence(key).spawn(count)]


# (windows to decode, temperature) -> their results, in that order.
Search = Callable[[list[int], float], Searched]


def decode_with_fallback(search: Search, windows: int, text: Callable[[list[int]], str],
                         options: DecodeOptions) -> Decoded:
    """Decode `windows` windows by `search`, at temperature 0 and, with `options.fallback`,
    at the next temperatures for the windows that need it (module docstring); `text`
    turns token ids into text (for the compression ratio)."""
    temperatures = options.temperatures if options.fallback else options.temperatures[:1]
    tried: list[list[_Result]] = [[] for _ in range(windows)]
    pending = list(range(windows))
    for temperature in temperatures:
        if not pending:
            break
        found = search(pending, temperature)
        retry = []
        for k, w in enumerate(pending):
            ids = found.ids[k]
            result = _Result(Quality(temperature, found.sum_logprob[k] / (len(ids) + 1),
                                     compression_ratio(text(ids)), found.no_speech_prob[k]),
                             ids, found.looped[k])
            tried[w].append(result)
            if _needs_fallback(result, options):
                retry.append(w)
        pending = retry
    kept = [_kept(results, options) for results in tried]
    return Decoded([[] if options.fallback and _silence(r.quality, options) else r.ids
                    for r in kept], [r.looped for r in kept], [r.quality for r in kept])


@dataclass(frozen=True)
class _Result:
    quality: Quality
    ids: list[int]
    looped: bool


def _repetitive(result: _Result, options: DecodeOptions) -> bool:
    # A loop the guard cut is what a high compression ratio detects, found early.
    return result.looped or result.quality.compression_ratio > \
        options.compression_ratio_threshold


def _needs_fallback(result: _Result, options: DecodeOptions) -> bool:
    quality = result.quality
    needs = _repetitive(result, options) or quality.avg_logprob < options.log_prob_threshold
    silence = (quality.no_speech_prob > options.no_speech_threshold
               and quality.avg_logprob < options.log_prob_threshold)
    return needs and not silence


def _silence(quality: Quality, options: DecodeOptions) -> bool:
    return (quality.no_speech_prob > options.no_speech_threshold
            and not quality.avg_logprob > options.log_prob_threshold)


def _kept(results: Sequence[_Result], options: DecodeOptions) -> _Result:
    """The result a window keeps: its last, unless that one failed too (it ran out of
    temperatures): then the most probable one that is not too repetitive (of all, if
    none)."""
    if not _needs_fallback(results[-1], options):
        return results[-1]
    plain = [r for r in results if not _repetitive(r, options)]
    return max(plain or results, key=lambda r: r.quality.avg_logprob)
