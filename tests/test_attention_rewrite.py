"""The ort-cpu rewrite of the exported float attention core into MultiHeadAttention."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from sfc.runtime.audio import load_audio
from sfc.runtime.features import whisper_windows
from sfc.targets.ort_rewrites import AttentionAsMultiHead, apply_rewrites


def _encode(model: onnx.ModelProto, features: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return [np.asarray(a) for a in session.run(None, {"input_features": features})]


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def test_whisper_encoder_attention_becomes_multihead(tiny_export: Path,
                                                     shortest_clips: list[Path]) -> None:
    model = onnx.load(str(tiny_export / "encoder.onnx"))
    features = whisper_windows(load_audio(shortest_clips[0]))[:1]
    expected = _encode(model, features)
    rewritten = _copy(model)
    assert "attention-as-multihead" not in apply_rewrites(_copy(model))  # opt-in
    assert apply_rewrites(rewritten, fused_attention=True)["attention-as-multihead"] == 4
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops.count("MultiHeadAttention") == 4 and "Softmax" not in ops
    # The shape arithmetic of the removed Reshapes went with them: nothing dangles.
    read = {i for n in rewritten.graph.node for i in n.input} | {
        o.name for o in rewritten.graph.output}
    assert all(any(o in read for o in n.output) for n in rewritten.graph.node)
    onnx.checker.check_model(rewritten)
    heads = {a.i for n in rewritten.graph.node if n.op_type == "MultiHeadAttention"
             for a in n.attribute if a.name == "num_heads"}
    assert heads == {6}
    for got, want in zip(_encode(rewritten, features), expected, strict=True):
        assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)


def test_attention_with_a_second_reader_is_left_alone(tiny_export: Path,
                                                      shortest_clips: list[Path]) -> None:
    model = onnx.load(str(tiny_export / "encoder.onnx"))
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    # The attention weights of one layer are also an output: that core must stay whole.
    model.graph.output.append(onnx.helper.make_tensor_value_info(
        softmax.output[0], onnx.TensorProto.FLOAT, None))
    features = whisper_windows(load_audio(shortest_clips[0]))[:1]
    expected = _encode(model, features)
    assert AttentionAsMultiHead().apply(model) == 3
    assert sum(n.op_type == "Softmax" for n in model.graph.node) == 1
    got = _encode(model, features)
    np.testing.assert_allclose(got[-1], expected[-1], rtol=0, atol=1e-6)
    assert np.linalg.norm(got[0] - expected[0]) <= 1e-5 * np.linalg.norm(expected[0])


def test_a_model_without_attention_is_unchanged() -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Softmax", ["x"], ["y"])], "g", [x], [y])
    model = onnx.helper.make_model(graph)
    before = model.SerializeToString()
    assert AttentionAsMultiHead().apply(model) == 0
    assert model.SerializeToString() == before


def test_fused_attention_is_an_ort_cpu_lowering_option() -> None:
    from sfc.build import BuildConfig
    from sfc.errors import SfcError
    from sfc.targets import OrtCpuTarget

    target = BuildConfig(target="ort-cpu", fused_attention=True).lowering_target()
    assert isinstance(target, OrtCpuTarget) and target.fused_attention
    assert not BuildConfig(target="ort-cpu").lowering_target().fused_attention  # type: ignore[attr-defined]
    with pytest.raises(SfcError, match=r"--fused-attention applies to --target ort-cpu only"):
        BuildConfig(target="sim", fused_attention=True)
