"""Greedy Whisper decoding over a KV-cached decoder step (pure numpy, no torch).

The decoder graph is a function (tokens, past K/V, cross K/V) -> (logits, present K/V);
this module only decides which token comes next, so the same loop runs over an ORT
session, a TensorRT engine, or a test double. Decoding is without timestamps unless a
`TimestampRules` is given: then the prompt drops <|notimestamps|> and OpenAI's timestamp
rules shape every step (`TimestampRules.apply`). A multilingual model's prompt names the
language spoken and the task (`decoding_prompt`); an English-only model's has neither.
The prompt and empty cache (`start`) and the masked next-token logits (`next_logits`) are
shared with beam search and sampling (`search`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol, runtime_checkable

import numpy as np

from ..card import WhisperDecoding
from ..errors import SfcError

__all__ = ["ENGLISH", "LOOP_GUARD", "TASKS", "TIMESTAMP_RULES", "TIME_PRECISION", "Decoded",
           "DecoderStep", "LoopGuard", "Narrowable", "Quality", "Start", "TimestampRules",
           "check_options", "compacted", "decoding_prompt", "greedy_decode", "guard_cut",
           "next_logits", "start", "suppression_mask"]

# Seconds per timestamp token: the encoder's 1500 positions over a 30 s window.
TIME_PRECISION = 0.02

TASKS = ("transcribe", "translate")  # translate: speech in any language to English text
ENGLISH = "en"  # what an English-only model's card prompt means

# (tokens [B, T], past_key, past_value) -> (logits [B, T, V], present_key, present_value);
# the cross-attention K/V are bound by the caller.
DecoderStep = Callable[[np.ndarray, np.ndarray, np.ndarray],
                       tuple[np.ndarray, np.ndarray, np.ndarray]]


@runtime_checkable
class Narrowable(Protocol):
    """A decoder step whose batch can shrink: `keep(rows)` binds its cross-attention K/V to
    the rows at positions `rows` of the current batch, in that order (`compacted`)."""

    def keep(self, rows: np.ndarray) -> None: ...


@dataclass(frozen=True)
class LoopGuard:
    """Ends a row whose output has become a repetition loop, keeping one copy of the unit.

    Greedy decoding by a damaged (e.g. 4-bit) model can lock into a loop ("170, 170, 170,
    ...") that runs to the length limit: hundreds of inserted words and up to ~445 decoder
    steps for one window. OpenAI's decoder re-decodes such windows at a higher temperature
    when the text's gzip compression ratio passes 2.4; sfc stops instead, which is
    deterministic and costs nothing on the edge. A row loops when its last tokens are at
    least `repeats` consecutive copies of a unit of at most `max_period` tokens and span at
    least `min_tokens` tokens (so a spoken "no, no, no" is never cut).
    """

    repeats: int = 4
    min_tokens: int = 24
    max_period: int = 32

    def cut(self, seq: Sequence[int]) -> int | None:
        """The length to keep if `seq` ends in a loop (its prefix plus one unit), else None."""
        n = len(seq)
        for p in range(1, min(self.max_period, n // self.repeats) + 1):
            span = max(self.repeats * p, self.min_tokens)
            if span > n or list(seq[n - span + p:]) != list(seq[n - span:n - p]):
                continue
            start = n - span  # walk back to where the periodic tail begins
            while start > 0 and seq[start - 1] == seq[start - 1 + p]:
                start -= 1
            return start + p
        return None


LOOP_GUARD = LoopGuard()


def guard_cut(guard: LoopGuard, seq: list[int], timestamp_begin: int) -> int | None:
    """`guard.cut` on the text tokens of `seq`, as a length of `seq` to keep.

    Timestamps are left out so that a loop whose copies sit in segments of their own
    (different, rising timestamps between them) is still seen; without timestamps the text
    tokens are the whole sequence and this is `guard.cut(seq)`.
    """
    text_at = [i for i, t in enumerate(seq) if t < timestamp_begin]
    keep = guard.cut([seq[i] for i in text_at])
    return None if keep is None else text_at[keep]


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """log(sum(exp(x))) over the last axis; -inf for rows that are all -inf."""
    top = x.max(axis=-1)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return safe + np.log(np.exp(x - safe[..., None]).sum(axis=-1))


@dataclass(frozen=True)
class TimestampRules:
    """OpenAI Whisper's timestamp logit rules (`ApplyTimestampRules` in whisper/decoding.py).

    On the logits of the next token, given each row's generated tokens so far: the first
    token is a timestamp of at most `max_initial` seconds; timestamps come in pairs (a
    segment's end, then the next one's start; a lone timestamp only right before the end of
    text); timestamps never decrease and a segment ends after it starts; and when the
    timestamps' summed probability exceeds that of every text token, the next token is a
    timestamp.

    One rule of sfc's own: where a row's `speech_after` says speech follows the time of
    its last timestamp (a VAD window's speech regions), the text may not end there. Whisper
    often ends a window's text at the start of its last utterance (a timestamp pair, then
    <|endoftext|>), as it does for speech cut by the window's end; a VAD window ends in a
    pause, so that utterance is whole in the window and is decoded there, not in a window
    of its own.
    """

    max_initial: float | None = 1.0
    # Per row of the batch, whether speech goes on after a time (s) of its window: where
    # it does, a timestamp there may not end the text (None: OpenAI's rules alone).
    speech_after: tuple[Callable[[float], bool] | None, ...] | None = None

    def apply(self, logits: np.ndarray, generated: Sequence[Sequence[int]],
              spec: WhisperDecoding, rows: Sequence[int] | None = None) -> None:
        """Mask `logits` [B, vocab] in place; `generated[p]` is the tokens so far of the
        row at position p, which is batch row `rows[p]` (default p)."""
        begin = spec.timestamp_begin
        for p, (row, seq) in enumerate(zip(logits, generated, strict=True)):
            if not seq:
                row[:begin] = -np.inf
                if self.max_initial is not None:
                    row[begin + round(self.max_initial / TIME_PRECISION) + 1:] = -np.inf
                continue
            last = seq[-1] >= begin
            penultimate = len(seq) < 2 or seq[-2] >= begin
            if last and penultimate:  # a segment's start (or a pair): text must follow
                row[begin:] = -np.inf
            elif last:  # a segment's end: the next start, or the end of text
                row[:spec.eot] = -np.inf
            after = self.speech_after[p if rows is None else rows[p]] \
                if self.speech_after else None
            if last and after is not None and after((seq[-1] - begin) * TIME_PRECISION):
                row[spec.eot] = -np.inf
            stamps = [t for t in seq if t >= begin]
            if stamps:
                # The next start may equal the last end; an end must pass its start.
                floor = stamps[-1] if last and not penultimate else stamps[-1] + 1
                row[begin:floor] = -np.inf
        # Softmax normalisation cancels out of the comparison, so raw logits suffice.
        text_wins = logits[:, :begin].max(axis=-1) >= _logsumexp(logits[:, begin:])
        logits[~text_wins, :begin] = -np.inf


TIMESTAMP_RULES = TimestampRules()


@dataclass(frozen=True)
class Quality:
    """How a window's decoding went, as OpenAI's `DecodingResult` reports it: the
    temperature of the kept result (0: greedy or beam search), its summed log-probability
    over its tokens and eot divided by their count, its text's gzip compression ratio, and
    the probability of the no-speech token at <|startoftranscript|>."""

    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


@dataclass(frozen=True)
class Decoded:
    """Generated ids per row (prompt and eot removed), which rows the loop guard ended, and
    (beam search or temperature fallback: `fallback.DecodeOptions`) each row's `Quality`."""

    ids: list[list[int]]
    looped: list[bool]
    quality: list[Quality] | None = None


@lru_cache(maxsize=16)
def suppression_mask(spec: WhisperDecoding, first: bool, timestamps: bool = False) -> np.ndarray:
    """Boolean [vocab] mask of tokens that may not be emitted.

    Suppressed always: the checkpoint's non-speech symbols and every special token above
    <|endoftext|> (start, languages, tasks, <|notimestamps|>), and the timestamps too
    unless `timestamps`. For the first token also blank and <|endoftext|>.
    """
    mask = np.zeros(spec.vocab_size, dtype=bool)
    mask[list(spec.suppress)] = True
    mask[spec.eot + 1 : spec.timestamp_begin if timestamps else None] = True
    if first:
        mask[list(spec.suppress_begin)] = True
    return mask


def check_options(spec: WhisperDecoding, language: str | None, task: str) -> str | None:
    """`language` as the card spells its codes (None stays None: the caller detects it, or
    the card's own prompt is used), after one-line errors for options the model cannot do.

    An English-only model knows no language or task tokens: English transcription is all
    it does, so "en" is accepted and anything else refused.
    """
    if task not in TASKS:
        raise SfcError(f"unknown task {task!r}: {' or '.join(TASKS)}")
    code = None if language is None else language.strip().lower()
    if not spec.languages:
        if code not in (None, ENGLISH) or task != "transcribe":
            asked = f"task {task!r}" if task != "transcribe" else f"language {language!r}"
            raise SfcError(f"this model is English-only: {asked} needs a multilingual "
                           "Whisper such as whisper-base")
        return code
    known = dict(spec.languages)
    if code is not None and code not in known:
        raise SfcError(f"unknown language {language!r}: the model knows {', '.join(known)}")
    return code


def decoding_prompt(spec: WhisperDecoding, timestamps: bool, language: str | None = None,
                    task: str = "transcribe") -> tuple[int, ...]:
    """The prompt to decode with: the card's, with the tokens of `language` (None: the
    card's own, English) and `task` in place of its language and task tokens on a
    multilingual model, and without its final <|notimestamps|> when decoding with
    timestamps (the token is what tells the model to emit none)."""
    code = check_options(spec, language, task)
    prompt = spec.prompt
    if spec.languages:
        langs, tasks = dict(spec.languages), dict(spec.tasks)
        lang_ids, task_ids = set(langs.values()), set(tasks.values())
        prompt = tuple(langs[code] if t in lang_ids and code is not None
                       else tasks[task] if t in task_ids else t for t in prompt)
    if not timestamps:
        return prompt
    if prompt[-1] != spec.timestamp_begin - 1:
        raise SfcError("the model card's prompt does not end with <|notimestamps|>; "
                       "cannot decode with timestamps")
    return prompt[:-1]


@dataclass(frozen=True)
class Start:
    """Where every decode of a batch begins: the prompt rows [B, T], the most new tokens,
    and an empty K/V cache."""

    tokens: np.ndarray
    limit: int
    past_k: np.ndarray
    past_v: np.ndarray


def start(spec: WhisperDecoding, batch: int, max_new_tokens: int | None,
          timestamps: TimestampRules | None, languages: Sequence[str | None] | None,
          task: str) -> Start:
    """The prompts of `batch` rows, row b in `languages[b]` (None, or no `languages`: the
    card's prompt's) for `task` (`decoding_prompt`): rows of one batch may be in different
    languages."""
    rows: list[str | None] = [None] * batch if languages is None else list(languages)
    if len(rows) != batch:
        raise ValueError(f"{len(rows)} languages for a batch of {batch}")
    width = len(spec.prompt) - (timestamps is not None)  # every language's prompt alike
    tokens = np.asarray([decoding_prompt(spec, timestamps is not None, lang, task)
                         for lang in rows], dtype=np.int64).reshape(batch, width)
    limit = spec.max_target_positions - tokens.shape[1]
    if max_new_tokens is not None:
        limit = min(limit, max_new_tokens)
    shape = (spec.n_layers, batch, spec.n_heads, 0, spec.head_dim)
    return Start(tokens, limit, np.zeros(shape, dtype=np.float32),
                 np.zeros(shape, dtype=np.float32))


def next_logits(logits: np.ndarray, spec: WhisperDecoding, first: bool,
                timestamps: TimestampRules | None,
                generated: Sequence[Sequence[int]],
                rows: Sequence[int] | None = None) -> np.ndarray:
    """The next-token logits [B, vocab] of a step's logits [B, T, vocab], float32, with the
    suppressed tokens and (with `timestamps`) the timestamp rules masked to -inf; `first`:
    the first generated token; `generated[b]`: row b's tokens so far."""
    last = logits[:, -1, :].astype(np.float32, copy=True)
    last[:, suppression_mask(spec, first, timestamps is not None)] = -np.inf
    if timestamps is not None:
        timestamps.apply(last, generated, spec, rows)
    return last


def compacted(done: np.ndarray) -> np.ndarray:
    """The positions of a batch's unfinished rows, in their new order: each finished
    position below the new size takes the last unfinished row after it, so a row moves at
    most once and no row is read after another was written over it (`Narrowable.keep`)."""
    size = int((~done).sum())
    order = np.arange(size)
    order[np.flatnonzero(done[:size])] = np.flatnonzero(~done[size:]) + size
    return order


def greedy_decode(step: DecoderStep, spec: WhisperDecoding, batch: int,
                  max_new_tokens: int | None = None,
                  guard: LoopGuard | None = LOOP_GUARD,
                  timestamps: TimestampRules | None = None,
                  languages: Sequence[str | None] | None = None,
                  task: str = "transcribe") -> Decoded:
    """Decode `batch` sequences greedily, ending looping rows by `guard` (None: never);
    with `timestamps`, the output interleaves timestamp tokens by those rules. Row b is
    decoded in `languages[b]` for `task` (`start`).

    A `Narrowable` step loses its finished rows: every later step runs on the unfinished
    ones only (VAD windows 8 at a time on three of BENCHMARKS.md's long recordings: 33% of
    the rows stepped were finished ones, each reading its window's cross K/V). Any other
    step keeps the whole batch, finished rows fed <|endoftext|>.
    """
    begin = start(spec, batch, max_new_tokens, timestamps, languages, task)
    tokens, past_k, past_v = begin.tokens, begin.past_k, begin.past_v
    out: list[list[int]] = [[] for _ in range(batch)]
    rows = np.arange(batch)  # the row of `out` at each position of the stepped batch
    done = np.zeros(batch, dtype=bool)
    looped = [False] * batch
    narrow = step if isinstance(step, Narrowable) else None
    for i in range(begin.limit):
        logits, past_k, past_v = step(tokens, past_k, past_v)
        nxt = next_logits(logits, spec, i == 0, timestamps,
                          [out[r] for r in rows], rows.tolist()).argmax(axis=-1)
        nxt[done] = spec.eot  # finished rows keep feeding eot; their output is ignored
        for p in np.flatnonzero(~done):
            b = rows[p]
            if nxt[p] == spec.eot:
                done[p] = True
                continue
            out[b].append(int(nxt[p]))
            keep = (guard_cut(guard, out[b], spec.timestamp_begin)
                    if guard is not None else None)
            if keep is not None:
                del out[b][keep:]
                done[p] = looped[b] = True
        if done.all():
            break
        if narrow is not None and done.any():
            order = compacted(done)
            narrow.keep(order)
            past_k, past_v = past_k[:, order], past_v[:, order]
            nxt, rows, done = nxt[order], rows[order], done[order]
        tokens = nxt[:, None].astype(np.int64)
    return Decoded(out, looped)
