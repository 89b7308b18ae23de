"""The Gathers' own INT8 copy of a block-quantized tied table (ort-cpu caps), in the
plan, the recipe, the QDQ writer, the ort-cpu rewrite and the sensitivity probes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
from onnx import numpy_helper
from test_quant_graphs import feeds_for, run, session, speech_model

from sfc.calib.objectives import switch_feed
from sfc.precision.probe import gate_name, switchable
from sfc.quant import (
    ORT_CPU_CAPS,
    TENSORRT_CAPS,
    PlanConfig,
    QuantSpec,
    Recipe,
    gather_copy_spec,
    make_plan,
    model_sha256,
    recipe_from_plan,
    write_qdq,
)
from sfc.quant.spec import TargetCaps
from sfc.quant.weights import Rounded, dequantize_weight, quantize_weight, weight_scales
from sfc.targets.ort_rewrites import apply_rewrites

# speech_model's Gather reads rows (axis 0) of 64: INT8 in blocks of 32 along each row
GATHER_INT8 = QuantSpec(8, "block", axis=1, block_size=32)


def _w4_recipe(model: onnx.ModelProto, caps: TargetCaps = ORT_CPU_CAPS,
               weight_bits: int = 4) -> Recipe:
    config = PlanConfig(weight_bits=weight_bits, activation_bits=None, block_size=16)
    plan = make_plan(model, config, caps)
    return recipe_from_plan(plan, {}, model_sha256(model), 0, config.to_dict())


def _table(model: onnx.ModelProto) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "E"))


def _gather_int8(table: np.ndarray) -> np.ndarray:
    scales = weight_scales(table, GATHER_INT8, "absmax")
    return dequantize_weight(quantize_weight(table, GATHER_INT8, scales), GATHER_INT8, scales)


def test_plan_gives_ort_cpu_block_tables_a_gather_copy_and_nothing_else() -> None:
    model = speech_model()
    entries = {t.tensor: t for t in _w4_recipe(model).tensors}
    assert entries["E"].spec.granularity == "block"
    assert entries["E"].gather_spec == GATHER_INT8  # blocks along the gathered rows
    assert entries["fc1.w"].gather_spec is None  # no Gather reads it
    text = _w4_recipe(model).to_json()
    assert Recipe.from_json(text).to_json() == text
    assert '"gather_spec"' in text
    # TensorRT shares one copy; INT8 tables need no copy; recipes without one keep
    # their earlier JSON (no key).
    assert {t.tensor: t for t in _w4_recipe(model, TENSORRT_CAPS).tensors}["E"].gather_spec \
        is None
    int8 = _w4_recipe(model, weight_bits=8)
    assert all(t.gather_spec is None for t in int8.tensors)
    assert '"gather_spec"' not in int8.to_json()


def test_gather_copy_falls_back_to_one_scale_per_row_when_32_does_not_divide() -> None:
    table = numpy_helper.from_array(np.ones((10, 48), np.float32), "T")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Gather", ["T", "i"], ["y"], axis=0, name="g")], "g",
        [onnx.helper.make_tensor_value_info("i", onnx.TensorProto.INT64, [2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [table])
    block4 = QuantSpec(4, "block", axis=1, block_size=16)
    assert gather_copy_spec(graph, "T", block4, ORT_CPU_CAPS) == QuantSpec(8, "channel", axis=0)
    assert gather_copy_spec(graph, "T", block4, TENSORRT_CAPS) is None
    assert gather_copy_spec(graph, "T", QuantSpec(8, "channel", axis=0), ORT_CPU_CAPS) is None


def test_gather_reads_int8_blocks_of_the_float_table_closer_than_the_4_bit_blocks() -> None:
    model = speech_model()
    recipe = _w4_recipe(model)
    qdq = write_qdq(model, recipe)
    onnx.checker.check_model(qdq, full_check=True)
    feeds = feeds_for(model)
    emb = session(qdq, optimize=False).run(["emb"], feeds)[0]
    np.testing.assert_allclose(emb, _gather_int8(_table(model))[feeds["ids"]], rtol=0, atol=1e-6)
    shared = write_qdq(model, replace(recipe, tensors=tuple(
        replace(t, gather_spec=None) for t in recipe.tensors)))
    float_emb = run(model, feeds)[1]
    shared_err = np.abs(run(shared, feeds)[1] - float_emb).max()
    assert np.abs(emb - float_emb).max() < shared_err / 3
    # The ort-cpu rewrite takes the INT8 copy as it is (its exact path), and the lm_head
    # MatMul still reads the 4-bit blocks.
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(qdq)
    assert apply_rewrites(rewritten)["gather-of-dequantized"] == 1
    np.testing.assert_array_equal(run(rewritten, feeds)[1], emb)
    dq = {n.output[0]: n for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    lm_head = next(n for n in qdq.graph.node if n.name == "lm_head")
    attrs = {a.name: a.i for a in dq[lm_head.input[1]].attribute}
    assert attrs == {"axis": 0, "block_size": 16}


def test_probes_switch_the_gather_copy_with_the_same_gate() -> None:
    model = speech_model()
    table = _table(model)
    spec = QuantSpec(4, "block", axis=1, block_size=16)  # the MatMul's copy
    scales = weight_scales(table, spec, "mse")
    block = Rounded(quantize_weight(table, spec, scales), spec, scales)
    int8 = weight_scales(table, GATHER_INT8, "absmax")
    rows = Rounded(quantize_weight(table, GATHER_INT8, int8), GATHER_INT8, int8)
    probe = switchable(model, {"E": [block]}, {"E": [rows]})
    feeds = feeds_for(model)
    off = session(probe.model).run(None, {**feeds, **switch_feed(probe.switches,
                                                                 {probe.gates[0]: 0.0})})
    on = session(probe.model).run(None, {**feeds, **switch_feed(probe.switches,
                                                                {gate_name("E", 0): 1.0})})
    float_out = run(model, feeds)
    np.testing.assert_allclose(off[1], float_out[1], atol=1e-6)
    np.testing.assert_allclose(on[1], _gather_int8(table)[feeds["ids"]], atol=1e-6)
    assert not np.allclose(on[0], float_out[0], atol=1e-4)  # lm_head reads the 4-bit E
