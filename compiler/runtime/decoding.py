"""Greedy Whisper decoding over a KV-cached decoder step (pure numpy, no torch).

The decoder graph is a function (tokens, past K/V, cross K/V) -> (logits, present K/V);
this module only decides which token comes next, so the same loop runs over an ORT
session, a TensorRT engine, or a test double.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np

from ..card import WhisperDecoding

__all__ = ["DecoderStep", "greedy_decode", "suppression_mask"]

# (tokens [B, T], past_key, past_value) -> (logits [B, T, V], present_key, present_value);
# the cross-attention K/V are bound by the caller.
DecoderStep = Callable[[np.ndarray, np.ndarray, np.ndarray],
                       tuple[np.ndarray, np.ndarray, np.ndarray]]


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
                  max_new_tokens: int | None = None) -> list[list[int]]:
    """Decode `batch` sequences greedily; return the generated ids (prompt and eot removed)."""
    limit = spec.max_target_positions - len(spec.prompt)
    if max_new_tokens is not None:
        limit = min(limit, max_new_tokens)
    shape = (spec.n_layers, batch, spec.n_heads, 0, spec.head_dim)
    past_k = np.zeros(shape, dtype=np.float32)
    past_v = np.zeros(shape, dtype=np.float32)
    tokens = np.tile(np.asarray(spec.prompt, dtype=np.int64), (batch, 1))
    out: list[list[int]] = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)
    for i in range(limit):
        logits, past_k, past_v = step(tokens, past_k, past_v)
        last = logits[:, -1, :].astype(np.float32, copy=True)
        last[:, suppression_mask(spec, i == 0)] = -np.inf
        nxt = last.argmax(axis=-1)
        nxt[done] = spec.eot  # finished rows keep feeding eot; their output is ignored
        for b in np.flatnonzero(~done):
            if nxt[b] == spec.eot:
                done[b] = True
            else:
                out[b].append(int(nxt[b]))
        if done.all():
            break
        tokens = nxt[:, None].astype(np.int64)
    return out
