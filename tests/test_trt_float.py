"""FP16/BF16 float layers in the TensorRT-ready graph, FP32 where a rule says.

The rules are data (`RULES`); these tests check each one on graphs that hold its ops, the
Q/DQ decisions that follow from them, that the result is valid ONNX that ONNX Runtime runs
close to the FP32 graph, and that ORT CPU evaluates an FP16 graph faithfully only with
`with_cpu_rounding`.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_quant_graphs import (
    absmax_scales,
    feeds_for,
    mlp_model,
    rel_l2,
    speech_model,
    versioned_ops_model,
)

from sfc.errors import SfcError
from sfc.quant import (
    TENSORRT_CAPS,
    PlanConfig,
    make_plan,
    model_sha256,
    recipe_from_plan,
    write_qdq,
)
from sfc.targets import TensorRTTarget
from sfc.targets.tensorrt import TRT_ONNX
from sfc.targets.tensorrt_plan import ProfileLimits, TrtVersion
from sfc.targets.trt_float import RULES, KeepFp32, fp32_nodes, lower_float, with_cpu_rounding
from sfc.targets.trt_rewrites import substitute_plugins


def _qdq(model: onnx.ModelProto, weight_bits: int = 8,
         activations: bool = True) -> onnx.ModelProto:
    config = PlanConfig(weight_bits=weight_bits, activation_bits=8 if activations else None,
                        block_size=16)
    plan = make_plan(model, config, TENSORRT_CAPS)
    scales = absmax_scales(model, feeds_for(model), [q.tensor for q in plan.activations])
    return write_qdq(model, recipe_from_plan(plan, scales, model_sha256(model), 0,
                                             config.to_dict()))


def _types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value, initializer and graph input/output (inferred)."""
    graph = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*graph.value_info, *graph.input, *graph.output)}
    types.update({i.name: i.data_type for i in graph.initializer})
    return types


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray],
         level: str = "basic") -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    sess = ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def test_every_rule_keeps_its_ops_in_fp32_and_nothing_else() -> None:
    outputs = frozenset({"y"})
    for rule in RULES:
        for op in rule.op_types:
            node = helper.make_node(op, ["a"], ["y" if rule.writes_output else "t"], name="n")
            assert rule.matches(node, outputs), (rule.name, op)
            if rule.writes_output:  # the same op inside the graph computes in FP16
                assert not rule.matches(helper.make_node(op, ["a"], ["t"]), outputs)
    plugin = next(r for r in RULES if r.custom_domain)
    assert plugin.matches(helper.make_node("Anything", ["a"], ["t"], domain="x.y"), outputs)
    float_ops = ("MatMul", "Add", "Mul", "Erf", "Conv", "Gather", "Transpose", "Div", "Where")
    for op in float_ops:
        node = helper.make_node(op, ["a"], ["t"])
        assert not any(r.matches(node, outputs) for r in RULES), op


def test_speech_graph_fp16_layers_and_fp32_rules() -> None:
    qdq = _qdq(speech_model())
    out, report = lower_float(qdq, "fp16")
    onnx.checker.check_model(out, full_check=True)
    types = _types(out)
    # The engine's inputs and outputs keep the types the runtime feeds and reads.
    assert [types[i.name] for i in out.graph.input] == [types[i.name] for i in qdq.graph.input]
    assert {types[o.name] for o in out.graph.output} == {TensorProto.FLOAT}
    by_rule = {rule: set(nodes) for rule, nodes in report.kept.items()}
    assert {"ln"} <= by_rule["normalization"] and by_rule["softmax"] == {"softmax"}
    assert by_rule["logits"] == {"lm_head"}
    # The logits come straight from the FP32 projection, not rounded through FP16 on the way.
    assert next(n for n in out.graph.node if "logits" in n.output).name == "lm_head"
    for name in ("ln", "softmax", "lm_head"):  # FP32 in, FP32 out
        node = _node(out, name)
        float_io = [types[t] for t in (*node.input[:1], *node.output)]
        assert set(float_io) == {TensorProto.FLOAT}, (name, float_io)
    for name in ("fc1", "act", "q_proj", "attn_qk", "residual2", "conv"):
        assert types[_node(out, name).output[0]] == TensorProto.FLOAT16, name
    # LayerNorm's weights stay FP32; weights of FP16 layers become FP16.
    assert types["ln.g"] == TensorProto.FLOAT and types["conv.b"] == TensorProto.FLOAT16
    # Q/DQ follow their readers: those of the FP32 logits projection keep FP32 scales,
    # the others take FP16 scales (opset 19 allows them).
    lm_dqs = {i for i in _node(out, "lm_head").input}
    for node in out.graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0] in lm_dqs:
            assert types[node.input[1]] == TensorProto.FLOAT and node.name in by_rule["qdq"]
    fc1_dq = next(n for n in out.graph.node
                  if n.op_type == "DequantizeLinear" and n.output[0] in _node(out, "fc1").input)
    assert types[fc1_dq.input[1]] == TensorProto.FLOAT16
    assert out.opset_import[0].version >= 19
    assert report.casts > 0 and "FP16" in report.note()


def test_fp16_graph_runs_in_onnxruntime_close_to_fp32() -> None:
    # Weights-only INT8: with INT8 activations, FP16 rounding also flips activation codes.
    qdq = _qdq(speech_model(), activations=False)
    out, _ = lower_float(qdq, "fp16")
    feeds = feeds_for(qdq)
    for want, got in zip(_run(qdq, feeds), _run(with_cpu_rounding(out), feeds, "none"),
                         strict=True):
        # A few FP16 roundings (2^-11 each) through six layers, not an FP32 copy.
        assert got.dtype == np.float32 and 0 < rel_l2(got, want) < 3e-3


def test_scales_fp16_cannot_hold_keep_their_qdq_in_fp32() -> None:
    qdq = _qdq(mlp_model())
    scale = next(n.input[1] for n in qdq.graph.node
                 if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    init = next(i for i in qdq.graph.initializer if i.name == scale)
    init.CopyFrom(numpy_helper.from_array(np.array(3e-6, np.float32), scale))  # FP16 subnormal
    kept = fp32_nodes(qdq, "fp16")
    x_qdq = {n.name for n in qdq.graph.node if scale in n.input}
    assert x_qdq and all(kept[name] == "qdq" for name in x_qdq)
    out, _ = lower_float(qdq, "fp16")
    types = _types(out)
    assert types[scale] == TensorProto.FLOAT
    assert numpy_helper.to_array(next(i for i in out.graph.initializer
                                      if i.name == scale)) == np.float32(3e-6)
    assert any(types[n.input[1]] == TensorProto.FLOAT16
               for n in out.graph.node if n.op_type == "DequantizeLinear")


def test_old_opsets_are_converted_for_fp16_qdq() -> None:
    qdq = _qdq(versioned_ops_model())
    assert qdq.opset_import[0].version < 19
    out, report = lower_float(qdq, "fp16")
    onnx.checker.check_model(out, full_check=True)
    assert out.opset_import[0].version == 19
    mean = _node(out, "mean")
    assert len(mean.input) == 2 and "axes" not in {a.name for a in mean.attribute}
    assert "mean" in report.kept["reduction"]
    feeds = feeds_for(qdq)
    assert rel_l2(_run(with_cpu_rounding(out), feeds, "none")[0], _run(qdq, feeds)[0]) < 1e-2


def test_bf16_graph_keeps_scales_fp32_and_rounds_weights_from_fp32() -> None:
    model = speech_model()
    qdq = _qdq(model, activations=False)
    out, report = lower_float(qdq, "bf16")
    onnx.checker.check_model(out, full_check=True)
    types = _types(out)
    assert types[_node(out, "act").output[0]] == TensorProto.BFLOAT16
    assert TensorProto.FLOAT16 not in types.values()
    qdq_nodes = [n for n in out.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq_nodes and all(types[n.input[1]] == TensorProto.FLOAT for n in qdq_nodes)
    assert len(report.kept["qdq"]) == len(qdq_nodes)
    bias = next(i for i in out.graph.initializer if i.name == "conv.b")
    source = numpy_helper.to_array(next(i for i in model.graph.initializer
                                        if i.name == "conv.b"))
    np.testing.assert_array_equal(numpy_helper.to_array(bias),
                                  source.astype(ml_dtypes.bfloat16))


def test_plugin_nodes_stay_fp32_between_fp16_layers() -> None:
    ready = _qdq(mlp_model(), weight_bits=2, activations=False)
    assert substitute_plugins(ready) == 2
    out, report = lower_float(ready, "fp16")
    types = _types(out)
    assert set(report.kept["plugin"]) == {"mm1", "mm2"}
    assert types[_node(out, "mm2").input[0]] == TensorProto.FLOAT
    assert types[_node(out, "relu").output[0]] == TensorProto.FLOAT16


def test_lowering_again_leaves_the_graph_alone() -> None:
    out, _ = lower_float(_qdq(mlp_model()), "fp16")
    again, report = lower_float(out, "fp16")
    assert again.SerializeToString() == out.SerializeToString() and report.earlier
    assert lower_float(_qdq(mlp_model()), "fp32")[0].SerializeToString() == \
        _qdq(mlp_model()).SerializeToString()
    with pytest.raises(SfcError, match="float type"):
        lower_float(out, "fp8")


def test_cpu_rounding_makes_onnxruntime_store_fp16_values() -> None:
    # x -> Cast(fp16) -> Mul(c) -> Add(d) -> Cast(fp32): ORT CPU has no FP16 Mul/Add; it
    # runs both in FP32 and drops every rounding after them, the final cast's included.
    c = np.array(1.0009766, np.float16)  # 1 + 2^-10
    d = np.array(-1.0, np.float16)
    nodes = [helper.make_node("Cast", ["x"], ["x16"], name="in", to=TensorProto.FLOAT16),
             helper.make_node("Mul", ["x16", "c"], ["p"], name="mul"),
             helper.make_node("Add", ["p", "d"], ["s"], name="add"),
             helper.make_node("Cast", ["s"], ["y"], name="out", to=TensorProto.FLOAT)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(c, "c"), numpy_helper.from_array(d, "d")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = np.array([1.0009766, 1.0019531, 0.99902344, 1.5], np.float32)
    x16 = x.astype(np.float16)
    stored = ((x16 * c).astype(np.float16) + d).astype(np.float16).astype(np.float32)
    unrounded = x16.astype(np.float32) * np.float32(c) + np.float32(d)
    assert not np.array_equal(stored, unrounded)  # the inputs make the rounding visible
    np.testing.assert_array_equal(_run(model, {"x": x}, "none")[0], unrounded)
    np.testing.assert_array_equal(_run(with_cpu_rounding(model), {"x": x}, "none")[0], stored)


def test_tensorrt_target_writes_fp16_float_layers_by_default(tmp_path: Path) -> None:
    onnx.save(_qdq(mlp_model()), str(tmp_path / "model.qdq.onnx"))
    limits = ProfileLimits(dims={"B": 1})
    result = TensorRTTarget(version=TrtVersion.parse("10.16"), limits=limits).lower(
        tmp_path / "model.qdq.onnx", tmp_path / "fp16")
    ready = onnx.load(str(tmp_path / "fp16" / TRT_ONNX))
    assert TensorProto.FLOAT16 in _types(ready).values()
    assert any(n.startswith("float layers FP16") for n in result.notes)
    TensorRTTarget(version=TrtVersion.parse("10.16"), limits=limits, float_type="fp32").lower(
        tmp_path / "model.qdq.onnx", tmp_path / "fp32")
    kept = onnx.load(str(tmp_path / "fp32" / TRT_ONNX))
    assert TensorProto.FLOAT16 not in _types(kept).values()
    with pytest.raises(SfcError, match="float type"):
        TensorRTTarget(float_type="fp8")


def test_rules_can_be_replaced() -> None:
    only_act = (KeepFp32("act", "test", op_types=frozenset({"Erf"})),)
    out, report = lower_float(_qdq(speech_model()), "fp16", rules=only_act)
    assert set(report.kept["act"]) == {"act"}
    assert _types(out)[_node(out, "ln").output[0]] == TensorProto.FLOAT16
