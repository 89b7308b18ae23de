"""Beam search and temperature sampling over a KV-cached decoder step (pure numpy).

OpenAI Whisper's `BeamSearchDecoder` and `GreedyDecoder` at a temperature (whisper/
decoding.py), on the same step, prompt and logit filters as `decoding.greedy_decode`.
Every window owns `group` consecutive rows of the batch: its beams, or its `best_of`
independent samples. Scores are sums of log-probabilities (log-softmax of the filtered
logits, at temperature 1 whatever the sampling temperature), eot's included.

Beam search: each step, each window's beams propose their `beam_size + 1` most probable
next tokens; the candidates are ranked by score, those ending in eot are kept as finished
(until `round(beam_size * patience)` are) and the best `beam_size` others continue, the
K/V cache rows gathered from the beams they extend (`np.take` on the batch axis). A window
is done when enough hypotheses finished; if the length limit comes first, its live beams
finish as they are. The loop guard ends a hypothesis as it ends a greedy row: it finishes,
cut to one copy of the loop. Beam size 1 is greedy decoding.

Sampling: each row draws its next token from softmax(logits / temperature) with its own
`np.random.Generator`, so a window's samples depend only on its generators, not on what
it is batched with.

The finished hypotheses of a window are ranked by OpenAI's `MaximumLikelihoodRanker`:
score / length, or with a `length_penalty` p, score / ((5 + length) / 6) ** p.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..card import WhisperDecoding
from .decoding import (
    DecoderStep,
    LoopGuard,
    Start,
    TimestampRules,
    guard_cut,
    next_logits,
    start,
)

__all__ = ["SearchSetup", "Searched", "beam_search", "log_softmax", "rank", "sample"]


@dataclass(frozen=True)
class SearchSetup:
    """What a search decodes with, besides its step: the model's decoding spec, the most
    new tokens, the loop guard, the timestamp rules (None: no timestamps), each window's
    language (None: the card's prompt's) and the task (`decoding.start`), the no-speech
    token's id (None: the vocabulary has none) and OpenAI's length penalty (`rank`)."""

    spec: WhisperDecoding
    max_new_tokens: int | None = None
    guard: LoopGuard | None = None
    timestamps: TimestampRules | None = None
    languages: Sequence[str | None] | None = None
    task: str = "transcribe"
    no_speech: int | None = None
    length_penalty: float | None = None

    def begin(self, windows: int, group: int) -> Start:
        """The prompts and empty cache of `group` rows per window."""
        langs = None if self.languages is None else [lang for lang in self.languages
                                                     for _ in range(group)]
        return start(self.spec, windows * group, self.max_new_tokens, self.timestamps, langs,
                     self.task)

    def cut(self, tokens: list[int]) -> int | None:
        """`guard_cut` of a hypothesis's tokens (None: no loop, or no guard)."""
        return (None if self.guard is None
                else guard_cut(self.guard, tokens, self.spec.timestamp_begin))

    def no_speech_probs(self, logits: np.ndarray, group: int) -> list[float]:
        """P(no-speech token) at the prompt's first position (<|startoftranscript|>) of
        each window (its first row of `group`) in a first step's logits [B, T, vocab]."""
        if self.no_speech is None:
            return [0.0] * (len(logits) // group)
        return [float(p) for p in
                np.exp(log_softmax(logits[::group, 0, :])[:, self.no_speech])]


@dataclass(frozen=True)
class Searched:
    """Per window: the chosen tokens (prompt and eot removed), whether the loop guard cut
    them, their summed log-probability (eot's included when they ended in one), and the
    no-speech token's probability at <|startoftranscript|> (0: no `no_speech` token)."""

    ids: list[list[int]]
    looped: list[bool]
    sum_logprob: list[float]
    no_speech_prob: list[float]


@dataclass
class _Hypothesis:
    tokens: list[int]
    score: float
    looped: bool = False


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log(softmax(x)) over the last axis, in float64 (-inf stays -inf)."""
    x = x.astype(np.float64)
    top = x.max(axis=-1, keepdims=True)
    shifted = x - top
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def rank(hypotheses: Sequence[tuple[Sequence[int], float]],
         length_penalty: float | None) -> int:
    """Index of the best (tokens, score) by OpenAI's length-normalised score."""

    def normalised(h: tuple[Sequence[int], float]) -> float:
        # Eot cannot be a window's first token (`suppression_mask`): length >= 1.
        length = max(len(h[0]), 1)
        penalty = length if length_penalty is None else ((5 + length) / 6) ** length_penalty
        return h[1] / penalty

    return max(range(len(hypotheses)), key=lambda i: normalised(hypotheses[i]))


def _top(logprobs: np.ndarray, k: int) -> np.ndarray:
    """The `k` best token ids of a row, best first, ties by lower id (as argmax breaks
    them, so that beam size 1 is greedy decoding)."""
    idx = np.argpartition(-logprobs, k - 1)[:k]
    return idx[np.lexsort((idx, -logprobs[idx]))]


def beam_search(step: DecoderStep, setup: SearchSetup, windows: int, beam_size: int,
                patience: float = 1.0) -> Searched:
    """Beam search for `windows` windows; `step` takes `windows * beam_size` rows (window
    w's cross K/V repeated on rows w * beam_size ...)."""
    spec = setup.spec
    rows = windows * beam_size
    wanted = round(beam_size * patience)
    begin = setup.begin(windows, beam_size)
    tokens, past_k, past_v = begin.tokens, begin.past_k, begin.past_v
    beams: list[_Hypothesis] = [_Hypothesis([], 0.0) for _ in range(rows)]
    finished: list[list[_Hypothesis]] = [[] for _ in range(windows)]
    no_speech_prob = [0.0] * windows
    for i in range(begin.limit):
        logits, past_k, past_v = step(tokens, past_k, past_v)
        if i == 0:
            no_speech_prob = setup.no_speech_probs(logits, beam_size)
        logprobs = log_softmax(next_logits(logits, spec, i == 0, setup.timestamps,
                                           [b.tokens for b in beams]))
        sources: list[int] = []
        kept: list[_Hypothesis] = []
        for w in range(windows):
            candidates: dict[tuple[int, ...], tuple[float, int]] = {}
            for r in range(w * beam_size, (w + 1) * beam_size):
                for t in _top(logprobs[r], beam_size + 1):
                    seq = (*beams[r].tokens, int(t))
                    candidates.setdefault(seq, (beams[r].score + float(logprobs[r, t]), r))
            # Stable: equal scores keep the order above (beam, then token rank).
            ranked = sorted(candidates.items(), key=lambda c: -c[1][0])
            done_here: list[_Hypothesis] = []
            live = 0
            for seq, (score, r) in ranked:
                if seq[-1] == spec.eot:
                    done_here.append(_Hypothesis(list(seq[:-1]), score))
                    continue
                keep = setup.cut(list(seq))
                if keep is not None:
                    done_here.append(_Hypothesis(list(seq[:keep]), score, looped=True))
                    continue
                kept.append(_Hypothesis(list(seq), score))
                sources.append(r)
                live += 1
                if live == beam_size:
                    break
            room = wanted - len(finished[w])
            finished[w] += done_here[:max(room, 0)]
            # Too few live candidates: only when the guard cut most of them, which in
            # practice completes the window. Its rows still step with the batch, fed the
            # best candidate at score -inf, so that such a row never wins.
            seq, (_, r) = ranked[0]
            for _ in range(beam_size - live):
                kept.append(_Hypothesis(list(seq), -np.inf))
                sources.append(r)
        beams = kept
        if all(len(f) >= wanted for f in finished):
            break
        order = np.asarray(sources)
        past_k, past_v = np.take(past_k, order, axis=1), np.take(past_v, order, axis=1)
        tokens = np.asarray([[b.tokens[-1]] for b in beams], dtype=np.int64)
    out = Searched([], [], [], no_speech_prob)
    for w in range(windows):
        pool = finished[w]
        if len(pool) < beam_size:  # the length limit came first: live beams finish
            unfinished = sorted(beams[w * beam_size:(w + 1) * beam_size],
                                key=lambda b: -b.score)
            pool = pool + unfinished[:beam_size - len(pool)]
        best = pool[rank([(h.tokens, h.score) for h in pool], setup.length_penalty)]
        out.ids.append(best.tokens)
        out.looped.append(best.looped)
        out.sum_logprob.append(best.score)
    return out


def sample(step: DecoderStep, setup: SearchSetup, windows: int, temperature: float,
           rngs: Sequence[np.random.Generator]) -> Searched:
    """Sampling at `temperature` > 0 for `windows` windows, `len(rngs) // windows` samples
    each (row r draws with `rngs[r]`; `step` takes those rows, window w's first), the best
    kept by `rank`."""
    spec = setup.spec
    rows = len(rngs)
    group = rows // windows
    begin = setup.begin(windows, group)
    tokens, past_k, past_v = begin.tokens, begin.past_k, begin.past_v
    out: list[list[int]] = [[] for _ in range(rows)]
    score = [0.0] * rows
    done = np.zeros(rows, dtype=bool)
    looped = [False] * rows
    no_speech_prob = [0.0] * windows
    for i in range(begin.limit):
        logits, past_k, past_v = step(tokens, past_k, past_v)
        if i == 0:
            no_speech_prob = setup.no_speech_probs(logits, group)
        last = next_logits(logits, spec, i == 0, setup.timestamps, out)
        logprobs = log_softmax(last)
        nxt = np.full(rows, spec.eot, dtype=np.int64)
        for r in map(int, np.flatnonzero(~done)):
            # Inverse-CDF draw: the first token whose cumulative probability passes u.
            cdf = np.cumsum(np.exp(log_softmax(last[r] / temperature)))
            u = float(rngs[r].random()) * float(cdf[-1])
            nxt[r] = min(int(np.searchsorted(cdf, u, side="right")), len(cdf) - 1)
            score[r] += float(logprobs[r, nxt[r]])
            if nxt[r] == spec.eot:
                done[r] = True
                continue
            out[r].append(int(nxt[r]))
            keep = setup.cut(out[r])
            if keep is not None:
                del out[r][keep:]
                done[r] = looped[r] = True
        if done.all():
            break
        tokens = nxt[:, None]
    result = Searched([], [], [], no_speech_prob)
    for w in range(windows):
        mine = range(w * group, (w + 1) * group)
        best = w * group + rank([(out[r], score[r]) for r in mine], setup.length_penalty)
        result.ids.append(out[best])
        result.looped.append(looped[best])
        result.sum_logprob.append(score[best])
    return result
