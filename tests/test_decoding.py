"""Greedy decoding and its repetition-loop guard, on scripted decoder steps (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from sfc.card import WhisperDecoding
from sfc.runtime.decoding import LOOP_GUARD, LoopGuard, greedy_decode

VOCAB = 64
EOT = 50
SPEC = WhisperDecoding(prompt=(60, 61), eot=EOT, timestamp_begin=62, suppress=(),
                       suppress_begin=(EOT,), max_target_positions=200, n_layers=1,
                       n_heads=1, head_dim=2, vocab_size=VOCAB)


def scripted(*rows: list[int]):  # type: ignore[no-untyped-def]
    """A decoder step whose row b emits rows[b][i] at step i (eot once the script ends)."""
    calls = [0]

    def step(tokens: np.ndarray, pk: np.ndarray,
             pv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        i = calls[0]
        calls[0] += 1
        logits = np.zeros((len(rows), tokens.shape[1], VOCAB), np.float32)
        for b, row in enumerate(rows):
            logits[b, -1, row[i] if i < len(row) else EOT] = 1.0
        return logits, pk, pv

    return step, calls


def test_cut_keeps_prefix_and_one_unit_of_a_loop() -> None:
    unit = [7, 8, 9]
    seq = [1, 2, 3, *unit * 8]  # a 3-token unit repeated 8 times spans 24 tokens
    assert LOOP_GUARD.cut(seq) == 3 + len(unit)


def test_cut_finds_where_the_periodic_tail_begins_mid_unit() -> None:
    # "We counted 170, 170, ..." : the prefix ends with the unit's first token.
    seq = [1, 2, 5, *[6, 5] * 12]
    assert LOOP_GUARD.cut(seq) == 2 + 2  # [1, 2, 5, 6]: the tail starts at the first 5


@pytest.mark.parametrize("seq", [
    [4, 5] * 5,                       # "no, no, no, no, no": 10 tokens, under min_tokens
    list(range(40)),                  # no repetition at all
    [1, 2, 3, 4, 5, 6, 7, 8] * 3,     # three copies of an 8-token phrase: under 4 repeats
    [9] * 23,                         # one token 23 times: under min_tokens
])
def test_cut_leaves_short_or_non_periodic_output_alone(seq: list[int]) -> None:
    assert LOOP_GUARD.cut(seq) is None


def test_cut_respects_max_period() -> None:
    unit = list(range(10))
    seq = unit * 4
    assert LoopGuard(max_period=10).cut(seq) == 10
    assert LoopGuard(max_period=9).cut(seq) is None


def test_greedy_decode_ends_only_the_looping_row() -> None:
    loop = [3, *[7, 8] * 60]  # would run 121 tokens without the guard
    clean = [4, 5, 6, *[7, 8] * 3, 9]
    step, calls = scripted(loop, clean)
    out = greedy_decode(step, SPEC, 2)
    assert out.ids == [[3, 7, 8], clean]
    assert out.looped == [True, False]
    assert calls[0] == 24 + 1  # the guard fires once the loop spans 24 tokens


def test_greedy_decode_without_guard_runs_the_loop_to_its_end() -> None:
    loop = [3, *[7, 8] * 60]
    step, _ = scripted(loop)
    out = greedy_decode(step, SPEC, 1, guard=None)
    assert out.ids == [loop] and out.looped == [False]
