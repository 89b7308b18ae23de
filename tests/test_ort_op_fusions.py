"""ort-cpu rewrites that let ORT fuse element-wise ops into their neighbours:
`GeluChannelScale` (a GELU whose closing Mul by 0.5 carries smoothing's per-channel vector
becomes ORT's fusable GELU and a Mul) and `fuse_integer_matmul_bias` (the bias Add after a
`MatMulIntegerToFloat` becomes its bias input), each computing the same values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sfc.targets.ort_rewrites import GeluChannelScale, apply_rewrites, fuse_integer_matmul_bias

CHANNELS = 6


def _gelu_model(last: np.ndarray, divisor_first: bool = False,
                swap: bool = False) -> onnx.ModelProto:
    """x @ W + b -> Div(sqrt 2) -> Erf -> Add(1) -> Mul(x) -> Mul(last) -> QDQ -> y: the
    exported GELU as smoothing leaves it (`last` a vector) or not (`last` 0.5)."""
    rng = np.random.default_rng(0)
    node = helper.make_node
    consts = {"w": rng.normal(size=(4, CHANNELS)).astype(np.float32),
              "b": rng.normal(size=CHANNELS).astype(np.float32),
              "root2": np.array(np.sqrt(2.0), np.float32), "one": np.array(1.0, np.float32),
              "q_scale": np.array(0.02, np.float32), "q_zero": np.array(0, np.int8)}
    nodes = [node("MatMul", ["x", "w"], ["xw"]), node("Add", ["b", "xw"], ["h"]),
             node("Constant", [], ["last"], value=numpy_helper.from_array(last, "last")),
             node("Div", ["root2", "h"] if divisor_first else ["h", "root2"], ["d"]),
             node("Erf", ["d"], ["e"]),
             node("Add", ["one", "e"] if swap else ["e", "one"], ["e1"]),
             node("Mul", ["e1", "h"] if swap else ["h", "e1"], ["p"]),
             node("Mul", ["last", "p"] if swap else ["p", "last"], ["g"]),
             node("QuantizeLinear", ["g", "q_scale", "q_zero"], ["gq"]),
             node("DequantizeLinear", ["gq", "q_scale", "q_zero"], ["y"])]
    graph = helper.make_graph(
        nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, CHANNELS]),
         helper.make_tensor_value_info("g", TensorProto.FLOAT, [2, 5, CHANNELS])],
        [numpy_helper.from_array(v, k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _session(model: onnx.ModelProto, level: ort.GraphOptimizationLevel,
             saved: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    if saved is not None:
        options.optimized_model_filepath = str(saved)
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _outputs(model: onnx.ModelProto) -> list[np.ndarray]:
    x = np.random.default_rng(1).normal(scale=2.0, size=(2, 5, 4)).astype(np.float32)
    return _session(model, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, {"x": x})


def _ops_after_ort(model: onnx.ModelProto, tmp_path: Path) -> list[str]:
    saved = tmp_path / "optimized.onnx"
    _session(model, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, saved)
    return [n.op_type for n in onnx.load(str(saved)).graph.node]


@pytest.mark.parametrize("swap", [False, True])
def test_smoothed_gelu_becomes_fusable_and_computes_the_same(swap: bool,
                                                             tmp_path: Path) -> None:
    vector = np.linspace(0.05, 0.3, CHANNELS).astype(np.float32)
    model = _gelu_model(vector, swap=swap)
    before = _outputs(model)
    assert "Erf" in _ops_after_ort(model, tmp_path)  # ORT leaves the vector GELU unfused
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert GeluChannelScale().apply(rewritten) == 1
    onnx.checker.check_model(rewritten)
    after = _outputs(rewritten)
    np.testing.assert_allclose(after[1], before[1], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(after[0], before[0])  # the quantized values too
    ops = _ops_after_ort(rewritten, tmp_path)
    assert "Erf" not in ops and ("BiasGelu" in ops or "Gelu" in ops)
    assert not any(n.op_type == "Constant" for n in rewritten.graph.node)  # old vector gone


def test_plain_gelu_and_other_divisions_are_left_alone() -> None:
    plain = _gelu_model(np.array(0.5, np.float32))
    assert GeluChannelScale().apply(plain) == 0
    inverted = _gelu_model(np.full(CHANNELS, 0.25, np.float32), divisor_first=True)
    assert GeluChannelScale().apply(inverted) == 0


def test_the_rewrite_is_one_of_the_ort_cpu_rules() -> None:
    model = _gelu_model(np.full(CHANNELS, 0.25, np.float32))
    assert apply_rewrites(model)["gelu-channel-scale"] == 1


def _biased_matmul(bias_first: bool, second_reader: bool) -> onnx.ModelProto:
    """QuantizeLinear(x) -> DQ -> MatMul(DQ(int8 W)) -> Add(b) -> y (and maybe z = y's input
    read twice): ORT makes the MatMul a MatMulIntegerToFloat and keeps the Add."""
    rng = np.random.default_rng(2)
    node = helper.make_node
    consts = {"w_q": rng.integers(-127, 128, size=(8, CHANNELS), dtype=np.int8),
              "w_scale": np.full(CHANNELS, 0.01, np.float32),
              "b": rng.normal(size=CHANNELS).astype(np.float32),
              "x_scale": np.array(0.05, np.float32), "x_zero": np.array(0, np.int8)}
    nodes = [node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
             node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"]),
             node("DequantizeLinear", ["w_q", "w_scale"], ["w"], axis=1),
             node("MatMul", ["xd", "w"], ["m"]),
             node("Add", ["b", "m"] if bias_first else ["m", "b"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if second_reader:
        nodes.append(node("Relu", ["m"], ["z"]))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        # Symbolic rows as in Whisper's graphs (with fixed ones ORT reshapes to a Gemm).
        nodes, "biased", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                        ["batch", "rows", 8])],
        outputs, [numpy_helper.from_array(v, k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("bias_first", [False, True])
def test_the_bias_add_after_an_integer_matmul_becomes_its_bias_input(
        bias_first: bool, tmp_path: Path) -> None:
    saved = tmp_path / "optimized.onnx"
    _session(_biased_matmul(bias_first, False), ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
             saved)
    optimized = onnx.load(str(saved))
    assert [n.op_type for n in optimized.graph.node].count("Add") == 1
    x = np.random.default_rng(3).normal(size=(3, 7, 8)).astype(np.float32)
    level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    before = _session(optimized, level).run(None, {"x": x})[0]
    assert fuse_integer_matmul_bias(optimized) == 1
    matmul = next(n for n in optimized.graph.node if n.op_type == "MatMulIntegerToFloat")
    assert len(matmul.input) == 7 and matmul.input[6] == "b" and matmul.output[0] == "y"
    assert "Add" not in [n.op_type for n in optimized.graph.node]
    np.testing.assert_allclose(_session(optimized, level).run(None, {"x": x})[0], before,
                               rtol=1e-6, atol=1e-6)


def test_an_integer_matmul_read_elsewhere_keeps_its_add(tmp_path: Path) -> None:
    saved = tmp_path / "optimized.onnx"
    _session(_biased_matmul(False, True), ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, saved)
    optimized = onnx.load(str(saved))
    assert "MatMulIntegerToFloat" in [n.op_type for n in optimized.graph.node]
    assert fuse_integer_matmul_bias(optimized) == 0
