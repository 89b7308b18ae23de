"""Beam search, seeded sampling and temperature fallback (`runtime.search`, `runtime.fallback`)
on decoders whose K/V cache carries the tokens fed so far, so a wrong cache reorder shows."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sfc.card import ModelCard, WhisperDecoding
from sfc.errors import SfcError
from sfc.runtime.decoding import LOOP_GUARD, TimestampRules, greedy_decode
from sfc.runtime.fallback import (
    DecodeOptions,
    compression_ratio,
    decode_with_fallback,
    sampling_rngs,
)
from sfc.runtime.features import LogMelSpec
from sfc.runtime.search import Searched, SearchSetup, beam_search, rank, sample
from sfc.runtime.subtitles import FORMATS
from sfc.runtime.whisper import WhisperRuntime
from tests import test_language
from tests.conftest import stacked_decoder_graph

VOCAB = 80
EOT = 50
NO_SPEECH = 59
SPEC = WhisperDecoding(prompt=(60, 61), eot=EOT, timestamp_begin=62, suppress=(),
                       suppress_begin=(EOT,), max_target_positions=40, n_layers=1,
                       n_heads=1, head_dim=2, vocab_size=VOCAB)
FLOOR = math.log(1e-9)  # the log-probability of every token a table leaves out

Table = Callable[[int, tuple[int, ...]], np.ndarray]  # (window, generated) -> logits [V]


class CacheStep:
    """A decoder step whose cache rows hold every token fed to them (channel 0) and the
    window id (channel 1): a row's logits are `table(window, generated tokens)`, read from
    its cache alone, so they are right only if the search kept each row's cache its own."""

    def __init__(self, table: Table, windows: np.ndarray) -> None:
        self.table, self.windows = table, windows  # windows: the window id of each row
        self.seen: list[tuple[int, tuple[int, ...]]] = []

    def __call__(self, tokens: np.ndarray, past_k: np.ndarray,
                 past_v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows, width = tokens.shape
        new = np.zeros((1, rows, 1, width, 2), np.float32)
        new[0, :, 0, :, 0] = tokens
        new[0, :, 0, :, 1] = self.windows[:, None]
        present = np.concatenate([past_k, new], axis=3)
        logits = np.zeros((rows, width, VOCAB), np.float32)
        for r in range(rows):
            history = present[0, r, 0, :, 0].astype(int).tolist()
            window = int(present[0, r, 0, 0, 1])
            generated = tuple(t for t in history if t not in SPEC.prompt)
            self.seen.append((window, generated))
            logits[r, :] = self.table(window, generated)
        return logits, present, present


def from_probs(probs: dict[int, float]) -> np.ndarray:
    logits = np.full(VOCAB, FLOOR, np.float32)
    for t, p in probs.items():
        logits[t] = math.log(p)
    return logits


def random_table(seed: int) -> Table:
    """Logits that are a fixed pseudo-random function of the window and the history."""

    def table(window: int, generated: tuple[int, ...]) -> np.ndarray:
        rng = np.random.default_rng([seed, window, len(generated), *generated])
        logits = rng.normal(0.0, 3.0, VOCAB).astype(np.float32)
        logits[EOT] += 0.4 * len(generated)  # so that sequences end
        return logits

    return table


# ------------------------------------------------------------------------- beam search

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("timestamps", [None, TimestampRules()])
def test_beam_size_one_gives_exactly_the_greedy_tokens(
        seed: int, timestamps: TimestampRules | None) -> None:
    windows = np.arange(3, dtype=np.float32)
    want = greedy_decode(CacheStep(random_table(seed), windows), SPEC, 3,
                         timestamps=timestamps)
    got = beam_search(CacheStep(random_table(seed), windows),
                      SearchSetup(SPEC, guard=None, timestamps=timestamps), 3, 1)
    assert got.ids == want.ids and got.looped == want.looped


# The greedy path takes A (0.6) then E (0.4): 0.24. B (0.4) then F (0.9) is 0.36.
A, B, C, D, E, F = 1, 2, 3, 4, 5, 6
TREE = {(): {A: 0.6, B: 0.4}, (A,): {C: 0.3, D: 0.3, E: 0.4}, (B,): {F: 0.9, C: 0.1},
        (A, E): {EOT: 1.0}, (B, F): {EOT: 1.0}, (A, C): {EOT: 1.0}, (A, D): {EOT: 1.0}}


def tree_table(window: int, generated: tuple[int, ...]) -> np.ndarray:
    return from_probs(TREE.get(generated, {EOT: 1.0}))


def test_beam_search_finds_the_more_probable_sequence_greedy_misses() -> None:
    windows = np.zeros(1, np.float32)
    assert greedy_decode(CacheStep(tree_table, windows), SPEC, 1).ids == [[A, E]]
    step = CacheStep(tree_table, np.zeros(2, np.float32))
    got = beam_search(step, SearchSetup(SPEC), 1, 2)
    assert got.ids == [[B, F]]
    assert got.sum_logprob[0] == pytest.approx(math.log(0.4 * 0.9), abs=1e-6)
    # Every history a row's cache held is one the search extended (no row read another
    # beam's cache): after step 1 both rows' beams come from swapped rows.
    assert {g for _, g in step.seen} <= {(), (A,), (B,), (A, E), (B, F)}


def test_beam_search_reorders_the_cache_of_each_window_within_its_rows() -> None:
    def table(window: int, generated: tuple[int, ...]) -> np.ndarray:
        # Window 1 mirrors window 0 with A and B swapped: its best is A F.
        swap = {A: B, B: A}
        if window == 1:
            generated = tuple(swap.get(t, t) for t in generated)
            probs = TREE.get(generated, {EOT: 1.0})
            return from_probs({swap.get(t, t): p for t, p in probs.items()})
        return tree_table(window, generated)

    step = CacheStep(table, np.repeat(np.arange(2, dtype=np.float32), 3))
    got = beam_search(step, SearchSetup(SPEC), 2, 3)
    assert got.ids == [[B, F], [A, F]]
    # Two-token histories are those the search built (window 1's in window 0's terms).
    swap = {A: B, B: A}
    two = {tuple(swap.get(t, t) if w else t for t in g) for w, g in step.seen if len(g) == 2}
    assert two <= set(TREE)


def test_rank_divides_by_length_or_applies_the_length_penalty() -> None:
    hyps = [([1], -1.0), ([1, 2, 3, 4], -2.0)]
    assert rank(hyps, None) == 1  # -0.5 per token beats -1.0
    assert rank(hyps, 0.0) == 0   # ((5 + n) / 6) ** 0 = 1: the summed score decides


def test_beam_search_applies_the_loop_guard_like_greedy() -> None:
    def loop(window: int, generated: tuple[int, ...]) -> np.ndarray:
        return from_probs({7 + len(generated) % 2: 0.9, 9: 0.1})

    windows = np.zeros(1, np.float32)
    want = greedy_decode(CacheStep(loop, windows), SPEC, 1)
    got = beam_search(CacheStep(loop, windows), SearchSetup(SPEC, guard=LOOP_GUARD), 1, 1)
    assert want.looped == [True] and got.ids == want.ids and got.looped == [True]


# ---------------------------------------------------------------------------- sampling

def test_seeded_sampling_is_reproducible_and_independent_of_the_batch() -> None:
    table = random_table(7)
    features = np.random.default_rng(0).normal(size=(2, 4, 8)).astype(np.float32)

    def run(seed: int, which: list[int]) -> Searched:
        rngs = [g for w in which for g in sampling_rngs(seed, features[w], 0.6, 3)]
        step = CacheStep(table, np.repeat(np.asarray(which, np.float32), 3))
        return sample(step, SearchSetup(SPEC), len(which), 0.6, rngs)

    first = run(1, [0, 1])
    assert run(1, [0, 1]) == first
    assert run(1, [1]).ids == first.ids[1:]  # alone, window 1 draws what it drew batched
    assert any(run(s, [0, 1]).ids != first.ids for s in (2, 3, 4))


def test_sampling_scores_at_temperature_one_whatever_the_sampling_temperature() -> None:
    probs = {A: 0.5, B: 0.5}

    def table(window: int, generated: tuple[int, ...]) -> np.ndarray:
        return from_probs(probs if not generated else {EOT: 1.0})

    got = sample(CacheStep(table, np.zeros(1, np.float32)), SearchSetup(SPEC), 1, 0.3,
                 sampling_rngs(0, np.zeros(1), 0.3, 1))
    assert got.sum_logprob[0] == pytest.approx(math.log(0.5), abs=1e-6)


# --------------------------------------------------------------------- temperature fallback

WORDS = {i: f"w{i}" for i in range(EOT)}


def words(ids: list[int]) -> str:
    return " ".join(WORDS[i] for i in ids)


def scripted_search(results: dict[float, tuple[list[int], float, float]],
                    calls: list[float]) -> Callable[[list[int], float], Searched]:
    """A search whose result at temperature T is results[T]: (ids, sum_logprob,
    no_speech_prob), the same for every window."""

    def search(rows: list[int], temperature: float) -> Searched:
        calls.append(temperature)
        ids, score, no_speech = results[temperature]
        return Searched([list(ids) for _ in rows], [False] * len(rows),
                        [score] * len(rows), [no_speech] * len(rows))

    return search


LOOP_IDS = [3, 4] * 20
CLEAN_IDS = list(range(1, 21))


def test_compression_ratio_flags_repetitive_text() -> None:
    assert compression_ratio(words(LOOP_IDS)) > 2.4 > compression_ratio(words(CLEAN_IDS))


def test_fallback_retries_a_repetitive_window_and_stops_at_the_first_acceptable_one() -> None:
    calls: list[float] = []
    search = scripted_search({0.0: (LOOP_IDS, -2.0, 0.0), 0.2: (LOOP_IDS, -2.0, 0.0),
                              0.4: (CLEAN_IDS, -4.0, 0.0), 0.6: (LOOP_IDS, -1.0, 0.0)},
                             calls)
    out = decode_with_fallback(search, 2, words, DecodeOptions(fallback=True))
    assert calls == [0.0, 0.2, 0.4]
    assert out.ids == [CLEAN_IDS, CLEAN_IDS]
    assert out.quality is not None
    q = out.quality[0]
    assert q.temperature == 0.4 and q.avg_logprob == pytest.approx(-4.0 / 21)
    assert q.compression_ratio == pytest.approx(compression_ratio(words(CLEAN_IDS)))


def test_without_fallback_the_first_result_stands() -> None:
    calls: list[float] = []
    search = scripted_search({0.0: (LOOP_IDS, -2.0, 0.0)}, calls)
    out = decode_with_fallback(search, 1, words, DecodeOptions(beam_size=2))
    assert calls == [0.0] and out.ids == [LOOP_IDS]


def test_when_every_temperature_fails_the_most_probable_plain_result_is_kept() -> None:
    calls: list[float] = []
    low = [5, 6, 7]  # plain text but improbable: avg -100 / 4 and -60 / 4
    search = scripted_search({0.0: (LOOP_IDS, -1.0, 0.0), 0.2: (low, -100.0, 0.0),
                              0.4: ([*low[:2], 8], -60.0, 0.0), 0.6: (LOOP_IDS, -1.0, 0.0),
                              0.8: (low, -90.0, 0.0), 1.0: (low, -80.0, 0.0)}, calls)
    out = decode_with_fallback(search, 1, words, DecodeOptions(fallback=True))
    assert len(calls) == 6
    assert out.ids == [[5, 6, 8]] and out.quality is not None
    assert out.quality[0].temperature == 0.4


def test_a_silent_window_is_not_retried_and_decodes_to_nothing() -> None:
    calls: list[float] = []
    search = scripted_search({0.0: ([5, 6], -9.0, 0.9)}, calls)
    out = decode_with_fallback(search, 1, words, DecodeOptions(fallback=True))
    assert calls == [0.0] and out.ids == [[]]


@pytest.mark.parametrize("kwargs, message", [
    ({"beam_size": 0}, "beam size"), ({"beam_size": -2}, "beam size"),
    ({"seed": -1}, "seed"), ({"best_of": 0}, "best_of"), ({"patience": 0.0}, "patience"),
    ({"temperatures": (0.2, 0.4)}, "temperatures"),
])
def test_bad_options_are_one_line_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(SfcError, match=message) as err:
        DecodeOptions(**kwargs)
    assert "\n" not in str(err.value)


def test_cli_refuses_a_bad_beam_size_in_one_line() -> None:
    from tests.test_cli import _assert_user_error, _sfc

    # Before any model is looked for (`sfc eval` builds its options the same way).
    _assert_user_error(_sfc("transcribe", "no-model", "x.wav", "--beam-size", "0"),
                       "beam size")


# ------------------------------------------------------ the runtime, with scripted sessions

# The scripted encoder of the language tests: cross K/V that carry each window's first
# feature (here, its id).
_Encoder = test_language._Encoder


class _Decoder:
    """`CacheStep` as an ORT session: each row's window id read from its cross K/V."""

    def __init__(self, table: Table) -> None:
        self.table = table

    def run(self, _names: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        step = CacheStep(self.table, feeds["cross_key"][0, :, 0, 0, 0])
        return list(step(feeds["tokens"], feeds["past_key"], feeds["past_value"]))


class _Tokenizer:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(f"t{i}" for i in ids if i < EOT)


def _runtime(table: Table, options: DecodeOptions) -> WhisperRuntime:
    card = ModelCard(name="m", family="whisper", graphs={"decoder": stacked_decoder_graph()},
                     objective="whisper-teacher-forced", decoding=SPEC)
    return WhisperRuntime(card=card, decoding=SPEC, mel=LogMelSpec(), encoder=_Encoder(),
                          decoder=_Decoder(table), tokenizer=_Tokenizer(),  # type: ignore[arg-type]
                          guard=None, options=options, no_speech=NO_SPEECH)


def _windows(n: int) -> np.ndarray:
    windows = np.zeros((n, 80, 3000), np.float32)
    windows[:, 0, 0] = np.arange(n)
    return windows


def test_runtime_beam_search_repeats_each_windows_cross_kv_per_beam() -> None:
    def table(window: int, generated: tuple[int, ...]) -> np.ndarray:
        # Window 1's tree is window 0's with A and B swapped (its best: A F).
        swap = {A: B, B: A} if window == 1 else {}
        probs = TREE.get(tuple(swap.get(t, t) for t in generated), {EOT: 1.0})
        return from_probs({swap.get(t, t): p for t, p in probs.items()})

    greedy = _runtime(table, DecodeOptions()).decode_windows(_windows(2))
    beam = _runtime(table, DecodeOptions(beam_size=2)).decode_windows(_windows(2))
    assert [t.text for t in greedy] == [f"t{A} t{E}", f"t{B} t{E}"]
    assert [t.text for t in beam] == [f"t{B} t{F}", f"t{A} t{F}"]


def test_runtime_json_records_each_windows_quality_and_the_options() -> None:
    def table(window: int, generated: tuple[int, ...]) -> np.ndarray:
        script = [62, A, B, 70]  # <|0.00|> A B <|0.16|>
        return from_probs({script[len(generated)]: 0.95, NO_SPEECH: 0.05}
                          if len(generated) < 4 else {EOT: 1.0})

    options = DecodeOptions(beam_size=2, fallback=True, seed=3)
    runtime = _runtime(table, options)
    out = runtime.transcribe(np.zeros(16000, np.float32), timestamps=True)
    doc = json.loads(FORMATS["json"].render(out))
    seg = doc["segments"][0]
    assert seg["temperature"] == 0.0 and seg["avg_logprob"] < 0
    assert seg["no_speech_prob"] == pytest.approx(0.05, rel=1e-3)
    assert seg["compression_ratio"] == pytest.approx(compression_ratio(f"t{A} t{B}"))
    assert doc["decoding"]["seed"] == 3 and doc["decoding"]["beam_size"] == 2
    greedy = _runtime(table, DecodeOptions()).transcribe(np.zeros(16000, np.float32),
                                                          timestamps=True)
    plain = json.loads(FORMATS["json"].render(greedy))
    assert "decoding" not in plain and "temperature" not in plain["segments"][0]


# ------------------------------------------------------------------------- the real model

def test_tiny_en_beam_size_one_is_greedy_on_real_audio(tiny_runtime: WhisperRuntime,
                                                       shortest_clips: list[Path]) -> None:
    from sfc.runtime.audio import load_audio
    from sfc.runtime.features import whisper_windows

    rt = tiny_runtime
    windows = np.concatenate([whisper_windows(load_audio(p), rt.mel)
                              for p in shortest_clips])
    cross_k, cross_v = rt.encode(windows)
    for rules in (None, TimestampRules()):
        want = greedy_decode(rt.step_fn(cross_k, cross_v), rt.decoding, len(windows),
                             timestamps=rules).ids
        got = beam_search(rt.step_fn(cross_k, cross_v),
                          SearchSetup(rt.decoding, timestamps=rules), len(windows), 1).ids
        assert got == want
