"""Tests for sfc.eval: manifests, WER counting, bootstrap statistics, results, evaluate."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from sfc.errors import SfcError
from sfc.eval import (
    ErrorCounts,
    EvalResult,
    UtteranceResult,
    bootstrap_ci,
    corpus_wer,
    count_errors,
    evaluate,
    normalize_text,
    paired_bootstrap_delta,
    read_manifest,
    render,
    summarize,
)

EVAL_DIR = Path(__file__).parents[1] / "calibration_data" / "eval"


# --- WER counting -------------------------------------------------------------------


def test_one_substitution() -> None:
    assert count_errors("the cat sat down", "the dog sat down") == ErrorCounts(1, 0, 0, 4)


def test_one_deletion() -> None:
    assert count_errors("the cat sat down", "the cat down") == ErrorCounts(0, 1, 0, 4)


def test_one_insertion() -> None:
    assert count_errors("the cat sat down", "the cat sat right down") == ErrorCounts(0, 0, 1, 4)


def test_case_and_punctuation_are_ignored() -> None:
    counts = count_errors("Hello, World! How are you?", "hello world how are you")
    assert counts.errors == 0
    assert counts.ref_words == 5


def test_spoken_and_written_numbers_count_equal() -> None:
    assert normalize_text("twenty five dollars") == normalize_text("$25")
    counts = count_errors("It costs twenty five dollars.", "it costs $25")
    assert counts.errors == 0


def test_empty_reference_counts_all_insertions() -> None:
    assert count_errors("", "two words") == ErrorCounts(0, 0, 2, 0)
    assert count_errors("!!", "") == ErrorCounts(0, 0, 0, 0)


def test_empty_hypothesis_counts_all_deletions() -> None:
    assert count_errors("three words here", "") == ErrorCounts(0, 3, 0, 3)


def test_corpus_wer_is_error_weighted_not_mean_of_utterances() -> None:
    short_wrong = ErrorCounts(1, 0, 0, 1)  # per-utterance WER 1.0
    long_right = ErrorCounts(0, 0, 0, 9)  # per-utterance WER 0.0
    assert corpus_wer([short_wrong, long_right]) == pytest.approx(0.1)  # mean would be 0.5


def test_corpus_wer_without_reference_words() -> None:
    assert corpus_wer([ErrorCounts(0, 0, 0, 0)]) == 0.0
    assert corpus_wer([ErrorCounts(0, 0, 2, 0)]) == float("inf")


# --- bootstrap ----------------------------------------------------------------------


def _synthetic(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref_words = rng.integers(5, 20, size=n)
    errors = rng.binomial(ref_words, 0.1)
    return errors, ref_words


def test_bootstrap_ci_contains_point_estimate() -> None:
    errors, ref_words = _synthetic(100)
    lo, hi = bootstrap_ci(errors, ref_words)
    point = errors.sum() / ref_words.sum()
    assert lo < point < hi


def test_bootstrap_ci_is_deterministic_for_a_seed_and_varies_across_seeds() -> None:
    errors, ref_words = _synthetic(100)
    assert bootstrap_ci(errors, ref_words, seed=3) == bootstrap_ci(errors, ref_words, seed=3)
    assert bootstrap_ci(errors, ref_words, seed=3) != bootstrap_ci(errors, ref_words, seed=4)


def test_bootstrap_ci_narrows_with_more_utterances() -> None:
    errors, ref_words = _synthetic(50)
    lo_small, hi_small = bootstrap_ci(errors, ref_words)
    # Same error rate, ten times the utterances.
    lo_big, hi_big = bootstrap_ci(np.tile(errors, 10), np.tile(ref_words, 10))
    assert hi_big - lo_big < 0.5 * (hi_small - lo_small)


def test_bootstrap_ci_rejects_mismatched_inputs() -> None:
    with pytest.raises(SfcError):
        bootstrap_ci([1, 2], [3])
    with pytest.raises(SfcError):
        bootstrap_ci([], [])
    with pytest.raises(SfcError):
        bootstrap_ci([1], [3], level=1.5)


def test_paired_delta_of_identical_systems_is_exactly_zero() -> None:
    errors, ref_words = _synthetic(100)
    d = paired_bootstrap_delta(errors, errors, ref_words)
    assert (d.delta, d.lo, d.hi) == (0.0, 0.0, 0.0)
    assert d.p_value == 1.0
    assert d.includes_zero


def test_paired_delta_detects_a_clearly_worse_system() -> None:
    errors, ref_words = _synthetic(100)
    worse = errors + 2
    d = paired_bootstrap_delta(errors, worse, ref_words)
    assert d.delta == pytest.approx(2 * 100 / ref_words.sum())
    assert 0.0 < d.lo <= d.delta <= d.hi
    assert not d.includes_zero
    assert d.p_value < 0.01
    # The sign follows B - A.
    assert paired_bootstrap_delta(worse, errors, ref_words).hi < 0.0


def test_paired_delta_small_noise_is_not_significant() -> None:
    errors, ref_words = _synthetic(100)
    b = errors.copy()
    b[0] += 1  # one extra error in ~1200 words
    d = paired_bootstrap_delta(errors, b, ref_words)
    assert d.includes_zero
    assert d.p_value > 0.05


# --- results ------------------------------------------------------------------------


def _utt(i: int, voice: str, condition: str, errors: int, ref_words: int) -> UtteranceResult:
    return UtteranceResult(
        id=f"u{i}",
        voice=voice,
        condition=condition,
        reference="ref",
        hypothesis="hyp",
        substitutions=errors,
        deletions=0,
        insertions=0,
        ref_words=ref_words,
        audio_s=2.0,
        compute_s=0.5,
    )


def _results() -> list[UtteranceResult]:
    voices = ["alice", "bob", "carol"]
    conditions = ["clean", "noise"]
    return [_utt(i, voices[i % 3], conditions[i % 2], i % 3, 10 + i % 5) for i in range(30)]


def _summary() -> EvalResult:
    return summarize("tiny", "eval", _results(), seed=0, n_resamples=500)


def test_summarize_overall_numbers() -> None:
    utts = _results()
    result = _summary()
    assert result.n == 30
    assert result.wer == pytest.approx(corpus_wer(utts))
    assert result.ci_lo <= result.wer <= result.ci_hi
    assert result.audio_s == pytest.approx(60.0)
    assert result.compute_s == pytest.approx(15.0)
    assert result.rtf == pytest.approx(0.25)


def test_summarize_groups_partition_the_utterances() -> None:
    result = _summary()
    assert set(result.per_condition) == {"clean", "noise"}
    assert set(result.per_voice) == {"alice", "bob", "carol"}
    for groups in (result.per_condition, result.per_voice):
        assert sum(g.n for g in groups.values()) == result.n
        assert sum(g.ref_words for g in groups.values()) == sum(
            u.ref_words for u in result.utterances
        )
    # alice has every third utterance starting at 0: i % 3 == 0 -> no errors.
    assert result.per_voice["alice"].wer == 0.0
    assert result.per_voice["carol"].wer > result.per_voice["bob"].wer > 0.0


def test_summarize_rejects_empty_input() -> None:
    with pytest.raises(SfcError):
        summarize("m", "d", [], seed=0, n_resamples=10)


def test_json_round_trip_is_equal(tmp_path: Path) -> None:
    result = _summary()
    assert EvalResult.from_json(result.to_json()) == result
    path = tmp_path / "sub" / "result.json"
    result.save(path)
    assert EvalResult.load(path) == result
    envelope = json.loads(path.read_text())
    assert (envelope["_type"], envelope["_version"]) == ("EvalResult", 2)


def test_loading_unknown_type_raises() -> None:
    envelope = json.loads(_summary().to_json())
    envelope["_type"] = "os.system"
    with pytest.raises(SfcError, match="unknown result type"):
        EvalResult.from_json(json.dumps(envelope))


def test_loading_bad_envelopes_raises(tmp_path: Path) -> None:
    envelope = json.loads(_summary().to_json())
    with pytest.raises(SfcError, match="version"):
        EvalResult.from_json(json.dumps({**envelope, "_version": 99}))
    del envelope["_data"]["wer"]
    with pytest.raises(SfcError, match="malformed"):
        EvalResult.from_json(json.dumps(envelope))
    with pytest.raises(SfcError):
        EvalResult.from_json("[1, 2]")
    with pytest.raises(SfcError):
        EvalResult.from_json("{not json")
    with pytest.raises(SfcError, match="not found"):
        EvalResult.load(tmp_path / "missing.json")


def test_render_shows_wer_ci_rtf_and_groups() -> None:
    result = _summary()
    console = Console(record=True, width=200)
    console.print(render(result))
    text = console.export_text()
    assert f"WER {100 * result.wer:.2f}%" in text
    assert f"95% CI [{100 * result.ci_lo:.2f}%, {100 * result.ci_hi:.2f}%]" in text
    assert "RTF 0.250" in text
    for name in ("condition=clean", "condition=noise", "voice=alice", "voice=carol"):
        assert name in text


# --- manifest -----------------------------------------------------------------------


def _write_manifest(folder: Path, lines: list[str], audio: tuple[str, ...] = ("a.wav",)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in audio:
        (folder / name).write_bytes(b"")
    path = folder / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_manifest_defaults_and_extra_keys(tmp_path: Path) -> None:
    path = _write_manifest(tmp_path, [json.dumps({"audio": "a.wav", "text": "hi", "snr": 5})])
    for source in (tmp_path, path, str(path)):
        (utt,) = read_manifest(source)
        assert utt.id == "a"
        assert utt.audio == (tmp_path / "a.wav").resolve()
        assert utt.audio.is_absolute()
        assert (utt.voice, utt.condition, utt.duration_s) == ("unknown", "unknown", None)
        assert dict(utt.extra) == {"snr": 5}


def test_manifest_bad_json_names_the_line(tmp_path: Path) -> None:
    good = json.dumps({"audio": "a.wav", "text": "hi"})
    _write_manifest(tmp_path, [good, "", '{"audio": "a.wav", "text": '])
    with pytest.raises(SfcError, match="line 3"):
        read_manifest(tmp_path)


def test_manifest_missing_audio_file(tmp_path: Path) -> None:
    _write_manifest(tmp_path, [json.dumps({"audio": "gone.wav", "text": "hi"})])
    with pytest.raises(SfcError, match="audio file not found"):
        read_manifest(tmp_path)


def test_manifest_missing_required_key(tmp_path: Path) -> None:
    _write_manifest(tmp_path, [json.dumps({"audio": "a.wav"})])
    with pytest.raises(SfcError, match="'text'"):
        read_manifest(tmp_path)


def test_manifest_empty(tmp_path: Path) -> None:
    _write_manifest(tmp_path, ["", "   "])
    with pytest.raises(SfcError, match="empty"):
        read_manifest(tmp_path)


def test_manifest_missing(tmp_path: Path) -> None:
    with pytest.raises(SfcError, match="not found"):
        read_manifest(tmp_path)


def test_manifest_duplicate_ids(tmp_path: Path) -> None:
    row = json.dumps({"audio": "a.wav", "text": "hi", "id": "x"})
    _write_manifest(tmp_path, [row, row])
    with pytest.raises(SfcError, match="duplicate id"):
        read_manifest(tmp_path)


def test_real_eval_manifest() -> None:
    utts = read_manifest(EVAL_DIR)
    assert len(utts) == 350
    assert all(u.audio.is_absolute() and u.audio.is_file() for u in utts)
    assert len({u.id for u in utts}) == 350
    assert {u.condition for u in utts} == {"clean", "noise", "reverb", "reverb+noise"}


# --- evaluate -----------------------------------------------------------------------


@pytest.fixture
def audio_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    """Use sfc.runtime.audio if it exists; otherwise stand in a soundfile reader."""
    try:
        importlib.import_module("sfc.runtime.audio")
    except ImportError:
        import soundfile as sf

        def load_audio(path: str | Path) -> np.ndarray:
            samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
            assert rate == 16_000
            return np.asarray(samples.mean(axis=1), dtype=np.float32)

        fake = types.ModuleType("sfc.runtime.audio")
        fake.load_audio = load_audio  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "sfc.runtime.audio", fake)


@pytest.mark.usefixtures("audio_loader")
def test_evaluate_with_perfect_transcriber() -> None:
    utts = read_manifest(EVAL_DIR)[:4]
    texts = iter(u.text for u in utts)

    def transcribe(audio: np.ndarray) -> str:
        assert audio.dtype == np.float32 and audio.ndim == 1
        _ = float(np.abs(audio).mean())  # a little real work to time
        return next(texts)

    result = evaluate(
        transcribe, utts, model="oracle", data="eval", n_resamples=100, progress=False
    )
    assert result.n == 4
    assert result.wer == 0.0
    assert (result.ci_lo, result.ci_hi) == (0.0, 0.0)
    assert result.rtf > 0.0
    for utt, res in zip(utts, result.utterances, strict=True):
        assert res.id == utt.id
        assert res.audio_s == pytest.approx(utt.duration_s, abs=0.01)
        assert res.compute_s > 0.0


@pytest.mark.usefixtures("audio_loader")
def test_evaluate_counts_errors_and_reports_progress() -> None:
    utts = read_manifest(EVAL_DIR)[:2]
    result = evaluate(lambda audio: "", utts, model="mute", data="eval", n_resamples=50)
    assert result.wer == 1.0
    assert all(u.deletions == u.ref_words > 0 for u in result.utterances)


@pytest.mark.usefixtures("audio_loader")
def test_evaluate_records_loop_guard_stops() -> None:
    from sfc.runtime.whisper import Transcript

    utts = read_manifest(EVAL_DIR)[:3]
    outs = iter([Transcript(utts[0].text), Transcript("go go", 1), Transcript("", 2)])
    result = evaluate(lambda audio: next(outs), utts, model="m", data="eval", n_resamples=20,
                      progress=False)
    assert [u.loop_stops for u in result.utterances] == [0, 1, 2]
    assert result.loop_stops == 3 and result.utterances[1].hypothesis == "go go"
    assert EvalResult.from_json(result.to_json()) == result
    assert "repetition loops stopped: 3" in str(render(result).caption)


# --- edge safety --------------------------------------------------------------------


def test_importing_sfc_eval_does_not_import_torch() -> None:
    code = (
        "import sys, sfc.eval; "
        "bad = sorted(m for m in ('torch', 'transformers') if m in sys.modules); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
