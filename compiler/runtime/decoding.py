"""Greedy Whisper decoding over a KV-cached decoder step (pure numpy, no torch).

The decoder graph is a function (tokens, past K/V, cross K/V) -> (logits, present K/V);
this module only decides which token comes next, so the same loop runs over an ORT
session, a TensorRT engine, or a test double.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..card import WhisperDecoding

__all__ = ["LOOP_GUARD", "Decoded", "DecoderStep", "LoopGuard", "greedy_decode", "suppression_mask"]

# (tokens [B, T], past_key, past_value) -> (logits [B, T, V], present_key, present_value);
# the cross-attention K/V are bound by the caller.
DecoderStep = Callable[[np.ndarray, np.ndarray, np.ndarray],
                       tuple[np.ndarray, np.ndarray, np.ndarray]]


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


@dataclass(frozen=True)
class Decoded:
    """Generated ids per row (prompt and eot removed) and which rows the loop guard ended."""

    ids: list[list[int]]
    looped: list[bool]


@lru_cache(maxsize=8)
def suppression_mask(spec: WhisperDecoding, first: bool) -> np.ndarray:
    """Boolean [vocab] mask of tokens that may not be emitted.

    Suppressed always: the checkpoint's non-speech symbols and every special token above
    <|endoftext|> (start, languages, tasks, <|notimestamps|> and all timestamps, since sfc
    transcribes without timestamps). For the first token also blank and <|endoftext|>.
    """
    mask = np.zeros(spec.vocab_size, dtype=bool)
    mask[list(spec.suppress)] = True
    mask[spec.eot + 1 :] = True
    if first:
        mask[list(spec.suppress_begin)] = True
    return mask


def greedy_decode(step: DecoderStep, spec: WhisperDecoding, batch: int,
                  max_new_tokens: int | None = None,
                  guard: LoopGuard | None = LOOP_GUARD) -> Decoded:
    """Decode `batch` sequences greedily, ending looping rows by `guard` (None: never)."""
    limit = spec.max_target_positions - len(spec.prompt)
    if max_new_tokens is not None:
        limit = min(limit, max_new_tokens)
    shape = (spec.n_layers, batch, spec.n_heads, 0, spec.head_dim)
    past_k = np.zeros(shape, dtype=np.float32)
    past_v = np.zeros(shape, dtype=np.float32)
    tokens = np.tile(np.asarray(spec.prompt, dtype=np.int64), (batch, 1))
    out: list[list[int]] = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)
    looped = [False] * batch
    for i in range(limit):
        logits, past_k, past_v = step(tokens, past_k, past_v)
        last = logits[:, -1, :].astype(np.float32, copy=True)
        last[:, suppression_mask(spec, i == 0)] = -np.inf
        nxt = last.argmax(axis=-1)
        nxt[done] = spec.eot  # finished rows keep feeding eot; their output is ignored
        for b in np.flatnonzero(~done):
            if nxt[b] == spec.eot:
                done[b] = True
                continue
            out[b].append(int(nxt[b]))
            keep = guard.cut(out[b]) if guard is not None else None
            if keep is not None:
                del out[b][keep:]
                done[b] = looped[b] = True
        if done.all():
            break
        tokens = nxt[:, None].astype(np.int64)
    return Decoded(out, looped)
