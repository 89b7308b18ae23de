"""Synthetic training speech: no evaluation sentence gets in, rendering is deterministic,
and nothing half-written is left under the output name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf

from sfc.calib.synth import held_out_clash, read_texts, synthesize
from sfc.errors import SfcError
from sfc.eval import read_manifest
from sfc.paths import BUNDLED_DATA
from tests.conftest import EVAL_DATA


def test_bundled_texts_are_not_evaluation_sentences() -> None:
    texts = read_texts(BUNDLED_DATA / "synth" / "texts.txt")
    assert len(texts) == len(set(texts)) > 100
    assert held_out_clash(texts, [EVAL_DATA]) is None


def test_an_evaluation_sentence_is_caught_whatever_its_case_and_punctuation(
        tmp_path: Path) -> None:
    sentence = read_manifest(EVAL_DATA)[7].text
    disguised = sentence.upper().rstrip(".?!") + "!!"
    assert held_out_clash(["A sentence of our own.", disguised], [EVAL_DATA]) == disguised
    with pytest.raises(SfcError, match="evaluation manifest"):
        synthesize([disguised], tmp_path / "s", held_out=[EVAL_DATA], progress=False)
    assert not (tmp_path / "s").exists()


def test_read_texts_skips_comments_and_refuses_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("# a comment\n\n  One sentence.  \nAnother one.\n")
    assert read_texts(path) == ["One sentence.", "Another one."]
    path.write_text("# nothing\n\n")
    with pytest.raises(SfcError, match="no sentence"):
        read_texts(path)


def test_synthesis_is_deterministic_and_readable_as_training_data(tmp_path: Path) -> None:
    pytest.importorskip("piper", reason="piper-tts (the synth extra) is not installed")
    texts = ["The ferry waited at the pier.", "Turn the oven down before the bread burns."]
    a = synthesize(texts, tmp_path / "a", seed=3, progress=False)
    b = synthesize(texts, tmp_path / "b", seed=3, progress=False)
    rows = [json.loads(line) for line in (a / "manifest.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == texts
    for r in rows:
        assert (a / r["audio"]).read_bytes() == (b / r["audio"]).read_bytes()
        audio, rate = sf.read(a / r["audio"])
        assert rate == 16000 and 1.0 < len(audio) / rate < 6.0
        assert 0.85 <= r["length_scale"] <= 1.15
    assert [u.id for u in read_manifest(a)] == ["synth_0001", "synth_0002"]
    with pytest.raises(SfcError, match="exists"):
        synthesize(texts, a, progress=False)
