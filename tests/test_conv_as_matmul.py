"""The ort-cpu rewrite of a quantized 1-D Conv into im2col + an INT8 MatMul."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sfc.targets.ort_rewrites import ConvAsMatMul, apply_rewrites


def _conv_model(w_q: np.ndarray, stride: int, pads: tuple[int, int], length: int,
                group: int = 1) -> onnx.ModelProto:
    """x -> Q -> DQ (s8, zero point 3) -> Conv(DQ(per-channel INT8 W), bias) -> y."""
    rng = np.random.default_rng(1)
    out_ch, in_per_group, _ = w_q.shape
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
        numpy_helper.from_array(np.array(3, np.int8), "xz"),
        numpy_helper.from_array(w_q, "wq"),
        numpy_helper.from_array(rng.uniform(0.001, 0.01, out_ch).astype(np.float32), "ws"),
        numpy_helper.from_array(rng.standard_normal(out_ch).astype(np.float32), "b"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq"),
        helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], axis=0, name="wdq"),
        helper.make_node("Conv", ["xd", "wd", "b"], ["y"], strides=[stride], pads=list(pads),
                         kernel_shape=[w_q.shape[2]], group=group, name="conv"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", in_per_group * group,
                                                                length])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, None])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(model: onnx.ModelProto, x: np.ndarray, level: ort.GraphOptimizationLevel
         ) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    session = ort.InferenceSession(model.SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def _optimized_ops(model: onnx.ModelProto, tmp_path: Path) -> list[str]:
    path = str(tmp_path / "opt.onnx")
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = path
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(path).graph.node]


# (taps, stride, pads, length): Whisper's two convs, an asymmetric pad, and a stride whose
# last window ends before the input does.
CASES = [(3, 1, (1, 1), 30), (3, 2, (1, 1), 30), (4, 2, (1, 2), 17), (2, 4, (0, 0), 13),
         (1, 1, (0, 0), 8)]


@pytest.mark.parametrize(("taps", "stride", "pads", "length"), CASES)
def test_rewritten_conv_computes_the_qdq_convs_values(
        taps: int, stride: int, pads: tuple[int, int], length: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # Pairs of weights within |a| + |b| <= 128: exact in ORT's integer GEMM on every CPU
    # class; without VNNI larger pairs saturate int16 (the test below).
    w_q = rng.integers(-64, 65, size=(6, 5, taps)).astype(np.int8)
    model = _conv_model(w_q, stride, pads, length)
    x = rng.standard_normal((2, 5, length)).astype(np.float32) * 3  # some saturate
    exact = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    expected = _run(model, x, exact)
    assert apply_rewrites(model)["conv-as-matmul"] == 1
    onnx.checker.check_model(model)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    ops = {n.op_type for n in model.graph.node}
    assert "Conv" not in ops and "wdq" not in {n.name for n in model.graph.node}
    got = _run(model, x, exact)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # ORT's own optimizer turns it into an integer GEMM, with the same values.
    fused = _run(model, x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    np.testing.assert_allclose(fused, expected, rtol=1e-4, atol=1e-4)
    assert "MatMulIntegerToFloat" in _optimized_ops(model, tmp_path)


def test_pairs_over_the_avx2_limit_keep_the_conv() -> None:
    w_q = np.full((4, 3, 3), 100, np.int8)  # every K-adjacent pair sums to 200 > 128
    model = _conv_model(w_q, 1, (1, 1), 10)
    assert ConvAsMatMul(pair_limit=128).apply(model) == 0
    assert "Conv" in {n.op_type for n in model.graph.node}
    assert ConvAsMatMul().apply(model) == 1  # VNNI: no pair limit


def test_weights_quantized_for_avx2_keep_their_pair_limit_after_the_rewrite() -> None:
    # The quantizer limits pairs along [M, C, k] flattened (c*k + j); the GEMM's K must
    # follow that order, or pairs it never limited would meet in one int16 sum.
    from sfc.quant.spec import QuantSpec
    from sfc.quant.weights import quantize_weight, weight_scales

    rng = np.random.default_rng(3)
    weight = rng.standard_normal((8, 6, 3)).astype(np.float32)
    spec = QuantSpec(8, "channel", axis=0, pair_limit=128)
    w_q = quantize_weight(weight, spec, weight_scales(weight, spec)).astype(np.int8)
    assert np.abs(w_q).max() > 64  # pairs the limit had to act on
    model = _conv_model(w_q, 1, (1, 1), 12)
    assert ConvAsMatMul(pair_limit=128).apply(model) == 1


def test_grouped_conv_is_left_alone() -> None:
    w_q = np.ones((4, 2, 3), np.int8)
    assert ConvAsMatMul().apply(_conv_model(w_q, 1, (1, 1), 10, group=2)) == 0


@pytest.mark.parametrize(("taps", "stride", "pads"), [(3, 1, (1, 1)), (3, 2, (1, 1)),
                                                      (4, 2, (1, 2)), (2, 4, (0, 0))])
def test_a_symbolic_frame_count_is_rewritten_for_every_length(
        taps: int, stride: int, pads: tuple[int, int]) -> None:
    """An encoder exported for `--encoder-window fit` has symbolic frames: one rewritten
    graph must compute the Conv's values at every input length (odd and even ones, which
    change how the strided windows end)."""
    rng = np.random.default_rng(2)
    w_q = rng.integers(-64, 65, size=(6, 5, taps)).astype(np.int8)
    model = _conv_model(w_q, stride, pads, 30)
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "frames"
    exact = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    original = onnx.ModelProto()
    original.CopyFrom(model)
    assert ConvAsMatMul().apply(model) == 1
    assert "Conv" not in {n.op_type for n in model.graph.node}
    for length in (30, 29, 17, 8, taps):
        x = rng.standard_normal((2, 5, length)).astype(np.float32) * 3
        expected = _run(original, x, exact)
        got = _run(model, x, exact)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
