"""Timestamps: OpenAI's timestamp rules on scripted logits, segments from timestamp tokens,
their place in the recording, the txt/json/srt/vtt/tsv writers (read back with subtitle
parsers), and `sfc transcribe --output-format/--output-dir` through the installed command."""

from __future__ import annotations

import csv
import html
import json
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sfc.card import WhisperDecoding
from sfc.errors import SfcError
from sfc.runtime.audio import load_audio
from sfc.runtime.decoding import (
    TIME_PRECISION,
    TIMESTAMP_RULES,
    Narrowable,
    TimestampRules,
    decoding_prompt,
    greedy_decode,
)
from sfc.runtime.segments import Segment, map_times, segments_from_tokens, window_clock
from sfc.runtime.subtitles import FORMATS, clock_time
from sfc.runtime.whisper import Transcript, WhisperRuntime

VOCAB = 100
EOT = 50
TS = 60  # timestamp_begin: 60 -> 0.00 s ... 99 -> 0.78 s; 59 is <|notimestamps|>
SPEC = WhisperDecoding(prompt=(55, TS - 1), eot=EOT, timestamp_begin=TS, suppress=(),
                       suppress_begin=(EOT,), max_target_positions=200, n_layers=1,
                       n_heads=1, head_dim=2, vocab_size=VOCAB)
LOW = -30.0  # a logit with next to no probability


def _logits(**favoured: float) -> np.ndarray:
    """One row [1, VOCAB] at LOW but for {"t<id>": logit}."""
    row = np.full((1, VOCAB), LOW, np.float32)
    for key, value in favoured.items():
        row[0, int(key[1:])] = value
    return row


def _pick(row: np.ndarray, seq: list[int], rules: TimestampRules = TIMESTAMP_RULES) -> int:
    rules.apply(row, [seq], SPEC)
    return int(row[0].argmax())


# ----------------------------------------------------------------------- timestamp rules

def test_prompt_drops_notimestamps_only_when_decoding_with_timestamps() -> None:
    assert decoding_prompt(SPEC, False) == SPEC.prompt
    assert decoding_prompt(SPEC, True) == (55,)
    odd = replace(SPEC, prompt=(55, 56))
    with pytest.raises(SfcError, match="notimestamps"):
        decoding_prompt(odd, True)


def test_first_token_is_a_timestamp_within_the_initial_bound() -> None:
    rules = TimestampRules(max_initial=0.1)  # 5 steps of 0.02 s: ids 60..65
    row = _logits(t5=10.0, t80=9.0, t66=8.0, t63=1.0)
    assert _pick(row, [], rules) == 63
    assert np.isneginf(row[0, :TS]).all() and np.isneginf(row[0, TS + 6:]).all()


def test_text_follows_a_segment_start_and_a_pair() -> None:
    for seq in ([TS], [TS, 5, TS + 10, TS + 11]):
        assert _pick(_logits(t70=5.0, t90=5.0, t7=1.0), seq) == 7


def test_a_segment_end_is_followed_by_a_start_no_earlier_or_the_end_of_text() -> None:
    seq = [TS, 5, TS + 10]
    row = _logits(t6=9.0, t69=8.0, t70=2.0)
    assert _pick(row, seq) == TS + 10  # the next start may equal the end, not precede it
    row = _logits(t6=9.0, t69=8.0, **{f"t{EOT}": 3.0})
    assert _pick(row, seq) == EOT


def test_a_segment_ends_after_it_starts() -> None:
    seq = [TS + 7, 5]
    row = _logits(t67=9.0, t66=9.0, t68=-5.0, t5=-6.0)
    assert _pick(row, seq) == TS + 8


@pytest.mark.parametrize(("n_stamps", "expect_timestamp"), [(20, True), (2, False)])
def test_timestamp_wins_when_their_summed_probability_beats_every_text_token(
        n_stamps: int, expect_timestamp: bool) -> None:
    # The best text token has logit 0; each timestamp -1: 20 e^-1 > 1 > 2 e^-1.
    row = _logits(t5=0.0, **{f"t{TS + 1 + i}": -1.0 for i in range(n_stamps)})
    picked = _pick(row, [TS, 4])
    assert (picked >= TS) == expect_timestamp
    if not expect_timestamp:
        assert picked == 5


def test_known_speech_after_a_timestamp_keeps_the_text_going() -> None:
    # Speech known until 0.30 s (ids up to TS + 15): a segment's end or a pair there may
    # not end the text; the rule's other masks stay.
    rules = TimestampRules(speech_after=(lambda t: t < 0.3,))
    eot = {f"t{EOT}": 9.0}
    assert _pick(_logits(t70=1.0, t5=3.0, **eot), [TS, 5, TS + 10], rules) == TS + 10
    assert _pick(_logits(t70=1.0, t6=2.0, **eot), [TS, 5, TS + 10, TS + 11], rules) == 6
    assert _pick(_logits(t6=2.0, **eot), [TS], rules) == 6
    # Past the known speech, after text, or without a predicate: OpenAI's rules.
    assert _pick(_logits(t90=1.0, **eot), [TS, 5, TS + 20], rules) == EOT
    assert _pick(_logits(t6=2.0, **eot), [TS, 5], rules) == EOT
    assert _pick(_logits(t70=1.0, **eot), [TS, 5, TS + 10],
                 TimestampRules(speech_after=(None,))) == EOT


def test_each_row_is_held_to_its_own_windows_speech() -> None:
    rules = TimestampRules(speech_after=(None, lambda t: True))
    seq = [TS, 5, TS + 10, TS + 11]
    rows = np.repeat(_logits(t6=2.0, **{f"t{EOT}": 9.0}), 2, axis=0)
    rules.apply(rows, [seq, seq], SPEC)
    assert rows.argmax(axis=-1).tolist() == [EOT, 6]
    # After finished rows left the batch, position 0 is batch row 1.
    rows = _logits(t6=2.0, **{f"t{EOT}": 9.0})
    rules.apply(rows, [seq], SPEC, rows=[1])
    assert rows.argmax(axis=-1).tolist() == [6]


def _scripted(script: list[int], fed: list[np.ndarray]):  # type: ignore[no-untyped-def]
    """A decoder step that favours script[i] at step i (eot after), recording its inputs."""

    def step(tokens: np.ndarray, pk: np.ndarray,
             pv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        i = len(fed)
        fed.append(tokens.copy())
        logits = np.full((1, tokens.shape[1], VOCAB), LOW, np.float32)
        logits[0, -1, script[i] if i < len(script) else EOT] = 0.0
        return logits, pk, pv

    return step


def test_greedy_decode_with_timestamps_drops_notimestamps_and_keeps_timestamp_tokens() -> None:
    script = [TS + 2, 5, 6, TS + 30, TS + 30, 7, TS + 35]
    fed: list[np.ndarray] = []
    out = greedy_decode(_scripted(script, fed), SPEC, 1, timestamps=TimestampRules())
    assert fed[0].tolist() == [[55]]
    assert out.ids == [script]
    fed.clear()
    plain = greedy_decode(_scripted(script, fed), SPEC, 1)  # the default: no timestamps
    assert fed[0].tolist() == [list(SPEC.prompt)]
    assert all(t < TS for t in plain.ids[0])


def test_loop_guard_sees_a_loop_whose_copies_are_separate_segments() -> None:
    # "<|0.00|> 7 8 <|0.02|><|0.02|> 7 8 <|0.04|><|0.04|> ...": rising timestamps between
    # the copies, so only the text tokens repeat.
    script = [TS]
    for i in range(1, 20):
        script += [7, 8, TS + i, TS + i]
    out = greedy_decode(_scripted(script, []), SPEC, 1, timestamps=TimestampRules())
    assert out.looped == [True]
    assert out.ids == [[TS, 7, 8, TS + 1, TS + 1]]  # one copy of the unit kept


def test_greedy_decode_holds_narrowed_rows_to_their_own_speech() -> None:
    # Two rows whose model would end at the pair <|0.20|><|0.20|>; row 1 has speech known
    # after it and goes on to 8 <|0.40|>; row 0 ends first and leaves the (narrowable)
    # batch, so row 1 is decoded at position 0 from then on.
    class Step:
        def __init__(self) -> None:
            self.rows = [0, 1]
            self.kept: list[list[int]] = []
            self.i = 0

        def keep(self, order: np.ndarray) -> None:
            self.rows = [self.rows[int(p)] for p in order]
            self.kept.append(list(self.rows))

        def __call__(self, tokens, pk, pv):  # type: ignore[no-untyped-def]
            script = [TS, 5, TS + 10, TS + 10, 8, TS + 20]
            logits = np.full((len(tokens), 1, VOCAB), LOW, np.float32)
            for p in range(len(tokens)):
                logits[p, -1, script[self.i] if self.i < len(script) else EOT] = 0.0
                if self.i == 4:  # the end of text beats the text after the pair
                    logits[p, -1, EOT] = 1.0
            self.i += 1
            return logits, pk, pv

    step = Step()
    assert isinstance(step, Narrowable)
    rules = TimestampRules(speech_after=(None, lambda t: t < 0.3))
    out = greedy_decode(step, SPEC, 2, timestamps=rules)
    assert out.ids == [[TS, 5, TS + 10, TS + 10], [TS, 5, TS + 10, TS + 10, 8, TS + 20]]
    assert step.kept == [[1]]


# -------------------------------------------------------------------------------- segments

def _words(ids: list[int]) -> str:
    return "".join(f" w{i}" for i in ids if i != 9)  # token 9 is blank


def test_segments_run_from_a_timestamp_over_text_to_the_next() -> None:
    ids = [TS, 1, 2, TS + 10, TS + 12, 3, TS + 20]
    got = segments_from_tokens(ids, TS, 30.0, _words)
    assert got == [Segment(0.0, pytest.approx(10 * TIME_PRECISION), "w1 w2", (TS, 1, 2, TS + 10)),
                   Segment(pytest.approx(12 * TIME_PRECISION), pytest.approx(20 * TIME_PRECISION),
                           "w3", (TS + 12, 3, TS + 20))]


def test_open_text_ends_at_the_window_end_and_blank_segments_are_dropped() -> None:
    ids = [TS, 9, TS + 5, TS + 5, 1, TS + 8, TS + 9, 2, 3]
    got = segments_from_tokens(ids, TS, 30.0, _words)
    assert [(s.text, s.tokens) for s in got] == [("w1", (TS + 5, 1, TS + 8)),
                                                 ("w2 w3", (TS + 9, 2, 3))]
    assert got[-1].end == 30.0


def test_window_clock_moves_segments_into_the_recording_and_clamps_to_its_audio() -> None:
    segs = [Segment(0.5, 2.0, "a", ()), Segment(0.14, 0.3, "b", ()),
            Segment(28.0, 30.0, "c", ())]
    got = map_times(segs, window_clock(90.0, 29.0))
    assert [(s.start, s.end) for s in got] == [(90.5, 92.0), (90.14, 90.3), (118.0, 119.0)]
    assert [s.text for s in got] == ["a", "b", "c"]


# -------------------------------------------------------------------------------- writers

TRICKY = Transcript(
    text="Fish & chips --> <i>now</i> second third",
    loop_stops=1,
    segments=(Segment(0.0, 2.5, "Fish & chips --> <i>now</i>", (TS, 1, TS + 5)),
              Segment(61.02, 62.5, "second", (TS + 7, 2)),
              Segment(3725.5, 3726.004, "third", (3,))))


def test_clock_time_carries_milliseconds_into_seconds_minutes_and_hours() -> None:
    assert clock_time(3725.5, ",") == "01:02:05,500"
    assert clock_time(59.9996, ".") == "00:01:00.000"


def test_srt_reads_back_with_the_srt_parser() -> None:
    srt = pytest.importorskip("srt")
    cues = list(srt.parse(FORMATS["srt"].render(TRICKY)))
    assert [c.index for c in cues] == [1, 2, 3]
    assert [(c.start.total_seconds(), c.end.total_seconds()) for c in cues] == \
        [(s.start, round(s.end, 3)) for s in TRICKY.segments or ()]
    assert [c.content for c in cues] == ["Fish & chips -> <i>now</i>", "second", "third"]


def test_vtt_reads_back_with_webvtt_py_markup_escaped() -> None:
    webvtt = pytest.importorskip("webvtt")
    cues = webvtt.from_string(FORMATS["vtt"].render(TRICKY))
    assert [(c.start_time.in_milliseconds(), c.end_time.in_milliseconds()) for c in cues] == \
        [(round(s.start * 1000), round(s.end * 1000)) for s in TRICKY.segments or ()]
    assert [html.unescape(c.text) for c in cues] == ["Fish & chips -> <i>now</i>", "second",
                                                     "third"]


def test_tsv_json_and_txt() -> None:
    rows = list(csv.reader(FORMATS["tsv"].render(TRICKY).splitlines(), delimiter="\t"))
    assert rows[0] == ["start", "end", "text"]
    assert rows[1:] == [["0", "2500", "Fish & chips --> <i>now</i>"],
                        ["61020", "62500", "second"], ["3725500", "3726004", "third"]]
    doc = json.loads(FORMATS["json"].render(TRICKY))
    assert doc["text"] == TRICKY.text and doc["loop_stops"] == 1
    assert [(s["id"], s["start"], s["end"], s["text"], tuple(s["tokens"]))
            for s in doc["segments"]] == \
        [(i, s.start, s.end, s.text, s.tokens) for i, s in enumerate(TRICKY.segments or ())]
    assert FORMATS["txt"].render(Transcript("a\tb\nc")) == "a b c\n"


def test_timed_formats_need_segments_and_empty_ones_still_parse() -> None:
    srt = pytest.importorskip("srt")
    webvtt = pytest.importorskip("webvtt")
    assert [name for name, f in FORMATS.items() if not f.timestamps] == ["txt"]
    with pytest.raises(ValueError, match="timestamps"):
        FORMATS["srt"].render(Transcript("text"))
    silent = Transcript("", segments=())
    assert list(srt.parse(FORMATS["srt"].render(silent))) == []
    assert len(webvtt.from_string(FORMATS["vtt"].render(silent))) == 0


# ---------------------------------------------------------------------- the real model

@pytest.fixture()
def runtime(tiny_runtime: WhisperRuntime) -> WhisperRuntime:
    return tiny_runtime


@pytest.fixture()
def clips(shortest_clips: list[Path]) -> list[Path]:
    return shortest_clips


def test_segments_are_placed_in_the_recording_across_windows(
        runtime: WhisperRuntime, clips: list[Path]) -> None:
    a, b = (load_audio(c) for c in clips)
    gap = 16000 * 30 - len(a) + 16000  # clip b starts at 31 s, in the second window
    recording = np.concatenate([a, np.zeros(gap, np.float32), b])
    seconds = len(recording) / 16000
    out = runtime.transcribe(recording, timestamps=True)
    segs = out.segments
    assert segs is not None and runtime.transcribe(recording).segments is None
    assert out.text == " ".join(s.text for s in segs)
    assert all(0.0 <= s.start < s.end <= seconds for s in segs)
    assert [s.start for s in segs] == sorted(s.start for s in segs)
    first = [s for s in segs if s.end <= 30.0]
    second = [s for s in segs if s.start >= 30.0]
    assert first and second and len(first) + len(second) == len(segs)
    # Each window's first segment starts within the initial bound of its window start,
    # and the second clip's words are in the second window's segments.
    assert first[0].start <= 1.0 and 30.0 <= second[0].start <= 31.0
    alone = runtime.transcribe(b).text.lower().split()
    assert len(set(alone) & set(" ".join(s.text for s in second).lower().split())) >= \
        len(alone) // 2


SFC = shutil.which("sfc")


def _sfc(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    assert SFC is not None, "the sfc command is not on PATH (pip install -e .)"
    return subprocess.run([SFC, *args], input=stdin, capture_output=True, check=False,
                          env=dict(os.environ))


def _one_line_error(done: subprocess.CompletedProcess[bytes], fragment: str) -> None:
    stderr = done.stderr.decode()
    assert done.returncode == 2 and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and fragment in stderr, stderr


def test_srt_files_per_input_and_stdin_written_into_the_output_dir(
        tiny_export: Path, runtime: WhisperRuntime, clips: list[Path], tmp_path: Path) -> None:
    srt = pytest.importorskip("srt")
    wav = tmp_path / "in" / "clip.wav"
    wav.parent.mkdir()
    sf.write(wav, *sf.read(clips[1], dtype="int16"), subtype="PCM_16")
    out = tmp_path / "subs"
    done = _sfc("transcribe", str(tiny_export), "--threads", "1", str(clips[0]), "-",
                "--output-format", "srt", "--output-dir", str(out), stdin=wav.read_bytes())
    assert done.returncode == 0, done.stderr
    assert done.stdout == b""
    written = {clips[0].stem + ".srt": clips[0], "stdin.srt": wav}
    assert sorted(p.name for p in out.iterdir()) == sorted(written)
    for name, source in written.items():
        cues = list(srt.parse((out / name).read_text()))
        expected = runtime.transcribe(load_audio(source), timestamps=True).segments or ()
        assert cues and [c.content for c in cues] == [s.text for s in expected]
        assert [c.start.total_seconds() for c in cues] == [s.start for s in expected]


def test_a_failed_input_leaves_its_existing_output_alone(
        tiny_export: Path, clips: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "subs"
    out.mkdir()
    bad = tmp_path / "notes.flac"
    bad.write_text("meeting notes")
    (out / "notes.vtt").write_text("earlier\n")
    done = _sfc("transcribe", str(tiny_export), "--threads", "1", "-f", "vtt", "-o", str(out),
                str(clips[0]), str(bad))
    stderr = done.stderr.decode().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr.decode()
    assert stderr == [f"wrote {out / clips[0].stem}.vtt", stderr[-1]]
    assert stderr[-1].startswith("error: ") and str(bad) in stderr[-1]
    assert (out / "notes.vtt").read_text() == "earlier\n"
    assert sorted(p.name for p in out.iterdir()) == [clips[0].stem + ".vtt", "notes.vtt"]


def test_json_of_one_file_goes_to_stdout(
        tiny_export: Path, runtime: WhisperRuntime, clips: list[Path]) -> None:
    done = _sfc("transcribe", str(tiny_export), "--threads", "1", "-f", "json", str(clips[0]))
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    expected = runtime.transcribe(load_audio(clips[0]), timestamps=True)
    assert doc["text"] == expected.text == " ".join(s["text"] for s in doc["segments"])
    assert doc["loop_stops"] == 0
    assert doc["segments"][0]["tokens"][0] >= runtime.decoding.timestamp_begin


@pytest.mark.parametrize(("args", "fragment"), [
    (["a.flac", "b.flac", "-f", "srt"], "--output-dir"),
    (["x/a.flac", "y/a.wav", "-f", "tsv", "-o", "subs"], "both be written"),
    (["a.flac", "-f", "docx"], "--output-format must be one of"),
])
def test_output_options_are_checked_before_the_model_opens(
        tmp_path: Path, args: list[str], fragment: str) -> None:
    # The model folder does not exist: a refusal about it would mean the options passed.
    _one_line_error(_sfc("transcribe", str(tmp_path / "no-model"), *args), fragment)
