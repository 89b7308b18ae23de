"""Greedy decoding and its repetition-loop guard, on scripted decoder steps (no model)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sfc.card import WhisperDecoding
from sfc.runtime.decoding import LOOP_GUARD, LoopGuard, compacted, greedy_decode

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


class NarrowingScript:
    """A `Narrowable` scripted step: position p holds row ident[p] (its "cross K/V"), which
    `keep` moves in place as the ORT step does; row r emits rows[r][i] at step i. Its cache
    carries each position's row, so a cache not reordered with the rows is caught."""

    def __init__(self, *rows: list[int]) -> None:
        self.rows, self.ident = rows, np.arange(len(rows))
        self.batches: list[int] = []

    def __call__(self, tokens: np.ndarray, pk: np.ndarray,
                 pv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        i, size = len(self.batches), len(tokens)
        self.batches.append(size)
        assert (pk == self.ident[None, :size, None, None, None]).all()
        logits = np.zeros((size, tokens.shape[1], VOCAB), np.float32)
        for p, r in enumerate(self.ident[:size]):
            script = self.rows[r]
            logits[p, -1, script[i] if i < len(script) else EOT] = 1.0
        mark = np.broadcast_to(self.ident[None, :size, None, None, None].astype(np.float32),
                               (1, size, 1, 1, 2))
        return logits, np.concatenate([pk, mark], axis=3), pv

    def keep(self, rows: np.ndarray) -> None:
        for dst, src in enumerate(rows):
            if src != dst:
                self.ident[dst] = self.ident[src]


def test_greedy_decode_drops_finished_rows_of_a_narrowable_step() -> None:
    scripts = [[1], [2, 3, 4, 5], [6, 7], [8, 9, 10], [11, 12, 13, 14, 15, 16]]
    narrowing = NarrowingScript(*scripts)
    out = greedy_decode(narrowing, SPEC, len(scripts))
    plain, calls = scripted(*scripts)
    assert out.ids == greedy_decode(plain, SPEC, len(scripts)).ids == scripts
    # A row's eot comes at the step after its script: row 0 at step 1, row 2 at 2, row 3
    # at 3, row 1 at 4, row 4 at 6; each later step runs without the row.
    assert narrowing.batches == [5, 5, 4, 3, 2, 1, 1] and calls[0] == 7


@given(st.lists(st.booleans(), min_size=1, max_size=12).filter(lambda d: not all(d)))
def test_compacted_keeps_each_unfinished_row_once_and_reads_before_writing(
        done: list[bool]) -> None:
    mask = np.asarray(done)
    order = compacted(mask)
    assert sorted(order.tolist()) == np.flatnonzero(~mask).tolist()
    moved = order != np.arange(len(order))
    # A moved row comes from beyond the new size: no source is a destination.
    assert (order[moved] >= len(order)).all()
