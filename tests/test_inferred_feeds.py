"""Calibration feeds inferred for ONNX models sfc did not export (issue 14, item 4): audio
inputs from the bundled calibration clips, zeros for recurrent states, 16000 for rates,
and one line saying how to pass `.npz` feeds when nothing can be inferred."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import sfc.calib.inferred_feeds as inferred
from sfc.calib.inferred_feeds import (
    MAX_FEEDS,
    MEL_CHUNKS,
    SAMPLE_CHUNKS,
    FeedSource,
    NoFeeds,
    feed_source,
)
from sfc.card import TensorSpec, graph_spec_from_onnx
from sfc.eval import read_manifest
from sfc.runtime.audio import load_audio
from sfc.runtime.features import LogMelSpec, whisper_windows
from tests.conftest import REPO

CALIB = REPO / "calibration_data" / "calib"
F32, I64 = TensorProto.FLOAT, TensorProto.INT64

Input = tuple[str, int, Sequence[int | str]]


def _model(folder: Path, inputs: Sequence[Input], reshape: Sequence[int] | None = None
           ) -> tuple[Path, tuple[TensorSpec, ...]]:
    """A graph passing every input through (the first reshaped to `reshape`, so that it
    runs only on that many elements); returns its file and input specs."""
    nodes, outputs, inits = [], [], []
    for i, (name, dtype, shape) in enumerate(inputs):
        if i == 0 and reshape is not None:
            inits.append(helper.make_tensor("target", I64, [len(reshape)], list(reshape)))
            nodes.append(helper.make_node("Reshape", [name, "target"], [f"{name}_out"]))
            outputs.append(helper.make_tensor_value_info(f"{name}_out", dtype, None))
        else:
            nodes.append(helper.make_node("Identity", [name], [f"{name}_out"]))
            outputs.append(helper.make_tensor_value_info(f"{name}_out", dtype, shape))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, t, s)
                                           for n, t, s in inputs], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    return path, graph_spec_from_onnx(model, path.name).inputs


def _source(folder: Path, inputs: Sequence[Input], reshape: Sequence[int] | None = None,
            data: Path = CALIB, limit: int | None = 2) -> FeedSource:
    path, specs = _model(folder, inputs, reshape)
    source = feed_source(data, path, specs, limit)
    assert isinstance(source, FeedSource), source
    return source


def _clip(i: int) -> np.ndarray:
    return load_audio(read_manifest(CALIB)[i].audio)


def _ramp(samples: int) -> Callable[[Path], np.ndarray]:
    """A stand-in for load_audio whose every sample is its own offset."""
    return lambda path: np.arange(samples, dtype=np.float32)


def test_raw_audio_chunk_is_the_longest_length_the_model_runs(tmp_path: Path) -> None:
    feeds = list(_source(tmp_path, [("audio", F32, ["batch", "samples"])], [1, 3, 160]).make())
    assert feeds and all(f["audio"].shape == (1, 480) for f in feeds)
    clip = _clip(0)
    chunks = clip[: len(clip) // 480 * 480].reshape(-1, 480)
    assert (chunks == feeds[0]["audio"][0]).all(axis=1).any()  # a chunk of the first clip


def test_raw_audio_of_any_length_takes_the_longest_candidate(tmp_path: Path) -> None:
    feeds = list(_source(tmp_path, [("x", F32, ["N", "T"])]).make())
    assert {f["x"].shape for f in feeds} == {(1, SAMPLE_CHUNKS[0])}


def test_fixed_chunks_are_spread_over_every_clip_without_overlap(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Clips are ramps here, so each chunk's first sample is its offset."""
    clips, size, full = 3, 512, 100
    monkeypatch.setattr(inferred, "load_audio", _ramp(full * size + 100))
    feeds = list(_source(tmp_path, [("pcm", F32, [1, size])], limit=clips).make())
    per_clip = len(feeds) // clips
    assert len(feeds) == clips * per_clip and 1 < per_clip < full
    for i in range(clips):
        starts = [int(f["pcm"][0, 0]) for f in feeds[i * per_clip : (i + 1) * per_clip]]
        assert all(s % size == 0 for s in starts)  # whole chunks of the clip
        assert starts == sorted(set(starts))  # distinct, in order
        # over the whole clip, evenly: as far from its start as from its end
        assert abs(starts[0] - ((full - 1) * size - starts[-1])) <= size


def test_feeds_are_capped_and_single_chunks_are_mid_clip(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """More clips than MAX_FEEDS: one chunk from each, the middle one, until the cap."""
    rows = [{"audio": str(u.audio), "text": u.text, "id": f"{n}"}
            for n, u in enumerate(read_manifest(CALIB) * 3)]
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(rows) > MAX_FEEDS
    length = 100 * 160
    monkeypatch.setattr(inferred, "load_audio", _ramp(length))
    source = _source(tmp_path, [("audio", F32, ["batch", 160])], data=data, limit=None)
    starts = [int(f["audio"][0, 0]) for f in source.make()]
    assert len(starts) == MAX_FEEDS
    assert all(abs(s + 80 - length / 2) <= 160 for s in starts)  # not the leading silence


@pytest.mark.parametrize("n_mels, frames", [(80, "frames"), (128, 3000)])
def test_log_mel_windows_are_whisper_features(tmp_path: Path, n_mels: int,
                                              frames: int | str) -> None:
    source = _source(tmp_path, [("input_features", F32, ["batch", n_mels, frames])], limit=1)
    feeds = list(source.make())
    expected = whisper_windows(_clip(0), LogMelSpec(n_mels=n_mels))[0]  # clips are < 30 s
    assert len(feeds) == 1 and feeds[0]["input_features"].shape == (1, n_mels, MEL_CHUNKS[0])
    np.testing.assert_allclose(feeds[0]["input_features"][0], expected)


def test_state_gets_zeros_and_rate_gets_16000(tmp_path: Path) -> None:
    inputs: list[Input] = [("input", F32, ["batch", "sequence"]),
                           ("h0", F32, [1, "batch_size", 64]), ("sr", I64, [])]
    feed = next(_source(tmp_path, inputs).make())
    assert list(feed) == ["input", "h0", "sr"]
    assert feed["h0"].shape == (1, 1, 64) and feed["h0"].dtype == np.float32
    assert not feed["h0"].any()
    assert feed["sr"].shape == () and feed["sr"].dtype == np.int64 and int(feed["sr"]) == 16000


@pytest.mark.parametrize("inputs, reshape, names", [
    ([("audio", F32, ["b", "t"]), ("tokens", I64, ["b", "n"])], None, ["'tokens'"]),
    ([("a", F32, ["b", "t"]), ("b", F32, ["b", "t"])], None, ["'a'", "'b'"]),
    ([("audio", F32, ["b", "t"]), ("state", F32, ["b", "seq", 64])], None, ["'state'", "seq"]),
    ([("ids", I64, ["b", "t"])], None, ["'ids'"]),
    ([("audio", F32, ["b", "t"])], [1, 7, 100], ["'audio'", "none of"]),  # no candidate runs
])
def test_uninferable_graphs_say_why_and_how_to_pass_feeds(
        tmp_path: Path, inputs: list[Input], reshape: list[int] | None,
        names: list[str]) -> None:
    path, specs = _model(tmp_path, inputs, reshape)
    got = feed_source(CALIB, path, specs)
    assert isinstance(got, NoFeeds)
    assert "\n" not in got.reason and "--calib DIR of .npz" in got.reason
    assert all(n in got.reason for n in names), got.reason


def test_a_folder_without_feeds_or_manifest_says_how_to_pass_feeds(tmp_path: Path) -> None:
    path, specs = _model(tmp_path, [("audio", F32, ["b", "t"])])
    empty = tmp_path / "empty"
    empty.mkdir()
    got = feed_source(empty, path, specs)
    assert isinstance(got, NoFeeds) and str(empty) in got.reason and "--calib" in got.reason


def test_npz_feeds_are_preferred_and_limited(tmp_path: Path) -> None:
    path, specs = _model(tmp_path, [("audio", F32, ["b", "t"])])
    data = tmp_path / "npz"
    data.mkdir()
    arrays = [np.full((1, 10), i, np.float32) for i in range(3)]
    for i, a in enumerate(arrays):
        np.savez(data / f"{i}.npz", audio=a)
    source = feed_source(data, path, specs, limit=2)
    assert isinstance(source, FeedSource) and source.count == 2
    got = [f["audio"] for f in source.make()]
    assert len(got) == 2 and all(np.array_equal(g, a) for g, a in zip(got, arrays, strict=False))


def test_feeds_stream_lazily_and_repeat_exactly(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    source = _source(tmp_path, [("audio", F32, ["b", 4000])], limit=3)
    first, second = list(source.make()), list(source.make())
    assert len(first) == len(second) > 3
    assert all(np.array_equal(a["audio"], b["audio"]) for a, b in zip(first, second,
                                                                        strict=True))
    loaded: list[Path] = []

    def counted(path: Path) -> np.ndarray:
        loaded.append(path)
        return load_audio(path)

    monkeypatch.setattr(inferred, "load_audio", counted)
    stream = source.make()
    assert loaded == []  # nothing is read before the first feed is asked for
    next(stream)
    assert len(loaded) == 1


def test_silero_vad_feeds_run_on_the_fp32_model_and_hear_speech() -> None:
    pytest.importorskip("silero_vad", reason="dev extra silero-vad not installed")
    model = Path(str(resources.files("silero_vad") / "data" / "silero_vad_16k_op15.onnx"))
    specs = graph_spec_from_onnx(onnx.load(str(model)), model.name).inputs
    source = feed_source(CALIB, model, specs, limit=20)
    assert isinstance(source, FeedSource), source
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    probs = []
    for feed in source.make():
        assert not feed["state"].any() and int(feed["sr"]) == 16000
        probs.append(float(session.run(None, feed)[0].squeeze()))
    assert len(probs) > 20 and all(0.0 <= p <= 1.0 for p in probs)
    # The clips are speech: feeds shaped as the model expects must find some.
    assert max(probs) > 0.5
