"""The ort-cpu rewrite of DQ(table) -> Gather into gather-then-dequantize."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sfc.targets.ort_rewrites import apply_rewrites


def _model(table: np.ndarray, scale: np.ndarray, gather_axis: int, dq_attrs: dict[str, int],
           opset: int, ir: int) -> onnx.ModelProto:
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, [2, 3])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("DequantizeLinear", ["t", "s"], ["table"], name="dq", **dq_attrs),
             helper.make_node("Gather", ["table", "idx"], ["y"], axis=gather_axis, name="g")]
    graph = helper.make_graph(nodes, "g", [idx], [out], [numpy_helper.from_array(table, "t"),
                                                          numpy_helper.from_array(scale, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    return model


def _run(model: onnx.ModelProto, idx: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"idx": idx})[0])


@pytest.mark.parametrize("gather_axis", [0, 1])
def test_int8_per_channel_table_is_exact(gather_axis: int) -> None:
    rng = np.random.default_rng(0)
    table = rng.integers(-127, 128, size=(16, 40)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, size=table.shape[gather_axis]).astype(np.float32)
    model = _model(table, scale, gather_axis, {"axis": gather_axis}, 13, 8)
    idx = rng.integers(0, table.shape[gather_axis], size=(2, 3))
    expected = _run(model, idx)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert apply_rewrites(rewritten)["gather-of-dequantized"] == 1
    assert "DequantizeLinear" not in {n.op_type for n in rewritten.graph.node}
    np.testing.assert_array_equal(_run(rewritten, idx), expected)
    # The integer table is reused, not copied.
    int8 = [t for t in rewritten.graph.initializer if t.data_type == TensorProto.INT8]
    assert [t.name for t in int8] == ["t"]


@pytest.mark.parametrize("gather_axis", [0, 1])
def test_int8_table_in_blocks_along_the_other_axis_is_exact(gather_axis: int) -> None:
    rng = np.random.default_rng(2)
    shape = (64, 24) if gather_axis == 1 else (24, 64)  # K = 64 in blocks of 16
    table = rng.integers(-127, 128, size=shape).astype(np.int8)
    k_axis = 1 - gather_axis
    scale_shape = list(shape)
    scale_shape[k_axis] = 4
    scale = rng.uniform(0.01, 0.1, size=scale_shape).astype(np.float32)
    model = _model(table, scale, gather_axis, {"axis": k_axis, "block_size": 16}, 21, 10)
    idx = rng.integers(0, 24, size=(2, 3))
    expected = _run(model, idx)
    assert apply_rewrites(model)["gather-of-dequantized"] == 1
    assert "DequantizeLinear" not in {n.op_type for n in model.graph.node}
    np.testing.assert_array_equal(_run(model, idx), expected)
    int8 = [t for t in model.graph.initializer if t.data_type == TensorProto.INT8]
    assert [t.name for t in int8] == ["t"]  # used as it is, not re-rounded


def test_int4_block_table_becomes_int8_rows() -> None:
    rng = np.random.default_rng(1)
    table = rng.integers(-8, 8, size=(64, 24)).astype(ml_dtypes.int4)
    scale = rng.uniform(0.01, 0.1, size=(2, 24)).astype(np.float32)
    model = _model(table, scale, 1, {"axis": 0, "block_size": 32}, 21, 10)
    idx = rng.integers(0, 24, size=(2, 3))
    expected = _run(model, idx)
    assert apply_rewrites(model)["gather-of-dequantized"] == 1
    got = _run(model, idx)
    # Re-expressed as INT8 per column: error at most half an INT8 step of that column.
    step = np.abs(expected).max(axis=0, keepdims=True) / 127.0
    assert np.all(np.abs(got - expected) <= step / 2 + 1e-7)


def test_dq_with_other_readers_is_left_alone() -> None:
    table = np.ones((4, 4), np.int8)
    model = _model(table, np.ones(4, np.float32), 1, {"axis": 1}, 13, 8)
    model.graph.node.append(helper.make_node("Identity", ["table"], ["z"], name="other"))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    assert apply_rewrites(model)["gather-of-dequantized"] == 0
