"""What the build holds during ESC and the activation guard (issue 13, whisper-base): the
objective's scores computed block by block give the same bits as over the whole array, and
an ESC objective keeps one batch of encoder outputs at a time where probes keep them all;
and the peak sampler of benchmarks/build_memory.py names the frame that holds the memory."""

from __future__ import annotations

import json
import threading
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from sfc.calib import objectives
from sfc.calib.objectives import (
    WhisperObjective,
    WhisperReference,
    _Batch,
    _log_softmax,
    _log_softmax_rows,
    score,
    teacher_forcing,
)
from sfc.runtime.cross import STACKED
from tests.conftest import bench_module

SPEC = SimpleNamespace(n_layers=2, n_heads=2, head_dim=3)
VOCAB = 11
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _whole_array_score(metric: str, logits: np.ndarray, targets: np.ndarray,
                       reference: np.ndarray | None) -> tuple[float, int]:
    """The score over all positions at once (the form before the blocks)."""
    logp = _log_softmax(logits)
    if metric == "teacher-forced":
        return -float(logp[np.arange(len(targets)), targets].astype(np.float64).sum()), \
            len(targets)
    assert reference is not None
    kl = (np.exp(reference) * (reference - logp)).sum(axis=-1)
    return float(kl.astype(np.float64).sum()), len(kl)


@pytest.mark.parametrize("rows", [1, 5, 64, 1000])
@pytest.mark.parametrize("metric", ["teacher-forced", "kl"])
def test_scores_in_blocks_are_the_same_bits(monkeypatch: pytest.MonkeyPatch, rows: int,
                                            metric: str) -> None:
    rng = np.random.default_rng(rows)
    logits = (rng.standard_normal((37, 5003)) * 4).astype(np.float32)
    targets = rng.integers(0, 5003, 37)
    reference = _log_softmax((rng.standard_normal((37, 5003)) * 4).astype(np.float32))
    monkeypatch.setattr(objectives, "_SCORE_ROWS", rows)
    assert score(metric, logits, targets, reference) == \
        _whole_array_score(metric, logits, targets, reference)
    assert np.array_equal(_log_softmax_rows(logits).view(np.uint32),
                          _log_softmax(logits).view(np.uint32))


class _Encoder:
    """Cross K/V that depend on the window and the encoder's one scale; counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def scale_feed(self, scales: Mapping[str, float]) -> dict[str, np.ndarray]:
        return {"s": np.asarray(scales["encoder:s"], np.float32)}

    def run(self, outputs: list[str], feed: Mapping[str, np.ndarray],
            scales: Mapping[str, float]) -> list[np.ndarray]:
        self.calls += 1
        level = float(feed["input_features"].mean()) * scales["encoder:s"]
        k = np.full((SPEC.n_layers, len(feed["input_features"]), SPEC.n_heads, 4,
                     SPEC.head_dim), level, np.float32)
        return [k, k + 1]

    def close(self) -> None:
        pass


class _Decoder:
    """Logits from the tokens, the cross K/V and one scale; records, at each call, how many
    distinct cross K arrays it has been given are still alive."""

    input_names = frozenset(STACKED)  # stacked cross K/V: the array itself, not views

    def __init__(self) -> None:
        self.seen: list[weakref.ref[np.ndarray]] = []
        self.alive: list[int] = []

    def run(self, outputs: list[str], feed: Mapping[str, np.ndarray],
            scales: Mapping[str, float]) -> list[np.ndarray]:
        cross = feed["cross_key"]
        self.seen.append(weakref.ref(cross))
        self.alive.append(len({id(a) for r in self.seen if (a := r()) is not None}))
        level = cross.mean(axis=(0, 2, 3, 4))[:, None, None] * scales["decoder:s"]
        tokens = feed["tokens"][..., None].astype(np.float32)
        return [np.sin(tokens * np.arange(VOCAB, dtype=np.float32) * 0.3 + level)]

    def close(self) -> None:
        pass


def _objective(keep: bool) -> tuple[WhisperObjective, _Encoder, _Decoder]:
    rng = np.random.default_rng(0)
    batches = []
    for lengths in ([3, 5], [4], [2, 6]):  # three batches of padded transcripts
        seqs = [list(rng.integers(0, VOCAB, n)) for n in lengths]
        tokens, mask = teacher_forcing(seqs, 1, 0)
        features = rng.standard_normal((len(seqs), 2, 8)).astype(np.float32)
        batches.append(_Batch(features, tokens, mask, None))
    encoder, decoder = _Encoder(), _Decoder()
    objective = WhisperObjective("teacher-forced", encoder, decoder,
                                 WhisperReference(tuple(batches), ()), SPEC, keep_encoded=keep)
    return objective, encoder, decoder


def test_esc_holds_one_batch_of_encoder_outputs_and_probes_reuse_them() -> None:
    calls = [{"encoder:s": 1.0, "decoder:s": 1.0}, {"encoder:s": 1.0, "decoder:s": 0.5},
             {"encoder:s": 2.0, "decoder:s": 0.7}]
    streamed, stream_enc, stream_dec = _objective(keep=False)
    kept, keep_enc, keep_dec = _objective(keep=True)
    values = [(streamed(s), kept(s)) for s in calls]
    assert all(a == b for a, b in values)
    assert len({a for a, _ in values}) == 3  # each call scores something different
    windows = 5
    # ESC: every call encodes afresh, and only the batch being scored is alive.
    assert stream_enc.calls == 3 * windows
    assert max(stream_dec.alive) == 1
    # Probes: the second call changes only the decoder's scale and reuses the outputs.
    assert keep_enc.calls == 2 * windows
    assert max(keep_dec.alive) == 3


@pytest.fixture(scope="module")
def bm() -> Any:
    """benchmarks/build_memory.py as a module (it imports its sibling `common` by name)."""
    return bench_module("build_memory")


def _hold_memory(peaks: list[dict[str, Any]], mib: int) -> None:
    """Hold `mib` MiB (pages touched) until the sampler has recorded RSS that high."""
    while not peaks:  # the sampler's first reading is the baseline
        time.sleep(0.01)
    target = peaks[-1]["rss_mib"] + mib * 3 // 4
    block = np.ones(mib * 2**20 // 8)
    deadline = time.monotonic() + 60
    while peaks[-1]["rss_mib"] < target and time.monotonic() < deadline:
        time.sleep(0.01)
    del block


def test_peak_sampler_names_the_frame_holding_the_memory(bm: Any) -> None:
    peaks: list[dict[str, Any]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=bm._sample_peaks, daemon=True, args=(
        threading.get_ident(), time.perf_counter(), peaks, stop))
    sampler.start()
    try:
        _hold_memory(peaks, 300)
    finally:
        stop.set()
        sampler.join()
    top = max(peaks, key=lambda p: p["rss_mib"])
    assert top["rss_mib"] >= peaks[0]["rss_mib"] + 200
    assert any(frame.endswith(":_hold_memory") for frame in top["stack"])


def test_peak_frames_reads_the_highest_sample(bm: Any, tmp_path: Path) -> None:
    trace = tmp_path / "t.json"
    low = ["benchmarks/build_memory.py:9:main", "compiler/build.py:1:build",
           "calib/stats.py:2:collect_stats"]
    high = ["benchmarks/build_memory.py:9:main", "compiler/build.py:3:build",
            "calib/objectives.py:4:__call__", "calib/objectives.py:5:score",
            "_core/_methods.py:6:_sum"]
    trace.write_text(json.dumps([{"t": 1, "rss_mib": 900, "stack": low},
                                 {"t": 2, "rss_mib": 2000, "stack": high},
                                 {"t": 3, "rss_mib": 1500, "stack": low}]))
    assert bm.peak_frames(trace) == "calib/objectives.py:5:score < calib/objectives.py:4:__call__"
    assert bm.default_json("whisper-base").name == "build_memory_base.json"
    assert bm.default_json("whisper-tiny.en").name == "build_memory.json"
