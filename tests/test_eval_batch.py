"""`sfc eval --batch N` and `sfc build --eval-batch N`: utterances transcribed N at a time
through `transcribe_many`, each given its batch's seconds by audio length."""

from __future__ import annotations

import hashlib
import types
from pathlib import Path

import numpy as np
import pytest

from sfc.eval import EvalResult, UtteranceResult, evaluate, read_manifest, render, shards, summarize
from sfc.eval.results import RESULT_VERSION
from sfc.eval.shards import Batched, transcribe_one
from sfc.executor import InProcess
from sfc.report import BuildReport, WerComparison, fp32_eval, render_markdown
from sfc.runtime.decoding import LOOP_GUARD
from sfc.runtime.whisper import Transcript
from tests.conftest import EVAL_DATA
from tests.test_cli import _assert_user_error, _sfc_many


def _stub(calls: list[int]) -> shards.ManyTranscriber:
    """A transcriber that names each recording by its length (and records batch sizes)."""

    def many(audios: list[np.ndarray]) -> list[Transcript]:
        calls.append(len(audios))
        return [Transcript(f"samples {len(a)}", loop_stops=len(a) % 3) for a in audios]

    return many


def test_batches_give_the_one_at_a_time_texts_in_order_with_a_partial_last_batch() -> None:
    utts = read_manifest(EVAL_DATA)[:5]
    calls: list[int] = []
    many = _stub(calls)
    one = evaluate(None, utts, model="m", data="d", progress=False, n_resamples=10,
                   executor=InProcess(lambda u: transcribe_one(lambda a: many([a])[0], u)))
    calls.clear()
    batched = evaluate(None, utts, model="m", data="d", progress=False, n_resamples=10,
                       executor=Batched(many, 2), batch=2)
    assert calls == [2, 2, 1]
    assert [u.id for u in batched.utterances] == [u.id for u in utts]
    assert [u.hypothesis for u in batched.utterances] == [u.hypothesis for u in one.utterances]
    assert [u.loop_stops for u in batched.utterances] == [u.loop_stops for u in one.utterances]
    assert [u.audio_s for u in batched.utterances] == [u.audio_s for u in one.utterances]
    assert (one.batch, batched.batch) == (1, 2)
    assert "decoded in batches of 2" in str(render(batched).caption)
    assert "batches" not in str(render(one).caption)


def test_compute_seconds_are_the_batch_time_split_by_audio_length(
        monkeypatch: pytest.MonkeyPatch) -> None:
    utts = read_manifest(EVAL_DATA)[:5]
    clock = [100.0]
    batch_s = iter([3.0, 0.5])

    def many(audios: list[np.ndarray]) -> list[str]:
        clock[0] += next(batch_s)
        return ["text"] * len(audios)

    monkeypatch.setattr(shards, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    out = list(Batched(many, 3).evaluate(utts))
    for part, seconds in ((out[:3], 3.0), (out[3:], 0.5)):
        assert sum(t.compute_s for t in part) == pytest.approx(seconds)
        total_audio = sum(t.audio_s for t in part)
        for t in part:
            assert t.compute_s == pytest.approx(seconds * t.audio_s / total_audio)
    assert len({t.audio_s for t in out[:3]}) > 1  # the split is not an even one


def test_batches_are_yielded_lazily() -> None:
    calls: list[int] = []
    results = Batched(_stub(calls), 2).evaluate(read_manifest(EVAL_DATA)[:5])
    next(results)
    assert calls == [2]  # a Ctrl-C now keeps the first batch, with nothing more decoded
    next(results)
    assert calls == [2]


def test_batch_and_ray_options_are_one_line_errors_before_any_model_is_loaded(
        tmp_path: Path) -> None:
    missing = str(tmp_path / "no-model")  # loading it would fail with another message
    for done in _sfc_many(["eval", missing, "--batch", "8", "--workers", "2"],
                          ["eval", missing, "--batch", "2", "--ray-address", "auto"]):
        _assert_user_error(done, "--batch with --workers/--ray-address is not supported")


def test_real_runtime_batched_eval_matches_one_at_a_time(tiny_export: Path) -> None:
    """The build's WER check (`pipeline._evaluate_folder`) with batch 4 on the real model:
    the batch-1 transcripts, the batch recorded, and a saved result read back."""
    from sfc.pipeline import _evaluate_folder

    one = _evaluate_folder(tiny_export, EVAL_DATA, 5, 1, "one")
    four = _evaluate_folder(tiny_export, EVAL_DATA, 5, 1, "four", batch=4)
    assert [u.hypothesis for u in four.utterances] == [u.hypothesis for u in one.utterances]
    assert four.batch == 4 and 0 < four.wer < 0.5
    assert sum(u.compute_s for u in four.utterances) == pytest.approx(four.compute_s)
    assert EvalResult.from_json(four.to_json()) == four
    old = one.to_dict()
    del old["_data"]["batch"]  # a result saved before batching
    assert EvalResult.from_dict(old) == one


def _result(batch: int) -> EvalResult:
    utt = UtteranceResult("u", "v", "c", "a b", "a b", 0, 0, 0, 2, 1.0, 0.1)
    return summarize("m", "d", [utt], seed=0, n_resamples=1, batch=batch)


def test_fp32_cache_key_depends_on_the_batch(tmp_path: Path) -> None:
    manifest = EVAL_DATA / "manifest.jsonl"
    runs: list[int] = []

    def run(batch: int) -> EvalResult:
        runs.append(batch)
        return _result(batch)

    for batch in (1, 8, 1, 8):
        got = fp32_eval(tmp_path, EVAL_DATA, 4, lambda batch=batch: run(batch), batch)
        assert got.batch == batch
    assert runs == [1, 8]  # each batch size computed once, never the other's reused
    # Batch 1 keeps the key of the caches written before batching.
    salt = f"4|{RESULT_VERSION}|{LOOP_GUARD!r}".encode()
    old_key = hashlib.sha256(manifest.read_bytes() + salt).hexdigest()[:16]
    caches = sorted(p.name for p in tmp_path.glob("eval-*.json"))
    assert len(caches) == 2 and f"eval-{old_key}.json" in caches


def _report(wer: WerComparison) -> BuildReport:
    config = {"weights": 8, "activations": 8, "calibrator": "mse", "target": "ort-cpu"}
    return BuildReport("src", config, (), (), 10, 5, wer, 1.0)


@pytest.mark.parametrize("batch", [1, 8])
def test_report_says_the_wer_check_batch(batch: int) -> None:
    wer = WerComparison("d", 4, 0.1, 0.1, 0.0, -0.01, 0.01, 1.0, True, 0.1, 0.1, batch=batch)
    md = render_markdown(_report(wer))
    assert ("(4 utterances, decoded in batches of 8)" in md) == (batch == 8)
    assert ("(4 utterances)" in md) == (batch == 1)
