"""GPTQ's `padding` weight: which encoder frames of a Whisper window hold audio, and the
Gram matrices a calibration pass sums with those frames' weights (issue 10)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper
from test_precision import _config

from sfc.calib.feeds import encoder_frame_weights
from sfc.calib.stats import StatsPass
from sfc.errors import SfcError
from sfc.pipeline import compile_model
from sfc.quant.gptq import GptqConfig, GramAccumulator
from sfc.runtime.audio import load_audio
from sfc.runtime.features import LogMelSpec, content_frames, whisper_windows
from tests.test_build import _feeds, _mlp


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SFC_CACHE", str(tmp_path / "cache"))


def test_content_frames_end_where_the_audio_does() -> None:
    rng = np.random.default_rng(0)
    for seconds in (0.5, 3.0, 29.0):
        audio = (0.1 * rng.standard_normal(round(seconds * 16000))).astype(np.float32)
        assert content_frames(whisper_windows(audio)[0]) == round(seconds * 100)
    # Digital silence inside the audio is still audio: it is not zero after normalising.
    gap = np.concatenate([np.zeros(16000, np.float32), 0.1 * np.ones(8000, np.float32)])
    assert content_frames(whisper_windows(gap)[0]) == 150
    assert content_frames(np.zeros((80, 3000), np.float32)) == 0
    with pytest.raises(ValueError, match="one window"):
        content_frames(np.zeros((1, 80, 3000), np.float32))


def test_encoder_frame_weights_cover_the_convolutions_reach() -> None:
    rng = np.random.default_rng(1)
    audio = (0.1 * rng.standard_normal(3 * 16000)).astype(np.float32)  # 300 log-mel frames
    weights = encoder_frame_weights(0.25)({"input_features": whisper_windows(audio)[:1]})
    # Frame j reads log-mel frames 2j - 1 .. 2j + 1: frame 150 still reads frame 299.
    assert weights.shape == (1500,)
    assert (weights[:151] == 1).all() and (weights[151:] == 0.25).all()
    with pytest.raises(SfcError, match="one window"):
        encoder_frame_weights(0.0)({"input_features": np.zeros((2, 80, 3000), np.float32)})


def test_a_calibration_pass_sums_the_encoders_frames_with_their_weights(
        tiny_export: Path, shortest_clips: list[Path]) -> None:
    """On the real encoder: the Gram of an fc1 input summed by a pass with padding weight 0
    equals the sum over the clip's audio frames of that input, taken from a plain run."""
    model = onnx.load(str(tiny_export / "encoder.onnx"))
    node = next(n for n in model.graph.node if n.name == "/encoder/layers.0/fc1/MatMul")
    x_name = node.input[0]
    window = whisper_windows(load_audio(shortest_clips[0]), LogMelSpec())[:1]
    weighed, plain = GramAccumulator(384), GramAccumulator(384)
    with StatsPass(model, [], grams={x_name: weighed},
                   row_weights=encoder_frame_weights(0.0)) as stats:
        stats.add({"input_features": window})
    with StatsPass(model, [], grams={x_name: plain}) as stats:
        stats.add({"input_features": window})

    model.graph.output.append(helper.make_tensor_value_info(x_name, onnx.TensorProto.FLOAT,
                                                            None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = ort.InferenceSession(model.SerializeToString(), options).run(
        [x_name], {"input_features": window})[0][0].astype(np.float64)
    audio = (content_frames(window[0]) + 2) // 2
    assert 100 < audio < 600  # a 2-6 s clip
    np.testing.assert_allclose(weighed.gram, x[:audio].T @ x[:audio], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(plain.gram, x.T @ x, rtol=1e-4, atol=1e-3)
    assert weighed.count == plain.count == 1500


def test_padding_weight_is_refused_where_it_cannot_apply(tmp_path: Path) -> None:
    src, feeds = _mlp(tmp_path / "mlp.onnx"), _feeds(tmp_path / "feeds", n=2)
    with pytest.raises(SfcError, match="not Whisper"):
        compile_model(str(src), tmp_path / "out", _config(
            feeds, weights=4, weight_method="gptq", gptq=GptqConfig(padding=0.0)),
            eval_data=None)
    assert not (tmp_path / "out").exists()
    with pytest.raises(SfcError, match="--gptq-padding"):
        _config(feeds, weights=4, weight_method="mse", gptq=GptqConfig(padding=0.5))
