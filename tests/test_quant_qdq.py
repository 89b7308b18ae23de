"""The Q/DQ writer: valid ONNX, runs in onnxruntime, close to float, fuses, deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from test_quant_graphs import (
    absmax_scales,
    feeds_for,
    mlp_model,
    rel_l2,
    run,
    session,
    speech_model,
    versioned_ops_model,
)

from sfc.build import target_caps
from sfc.errors import SfcError
from sfc.quant import (
    ORT_CPU_CAPS,
    TENSORRT_CAPS,
    PlanConfig,
    Recipe,
    make_plan,
    model_sha256,
    recipe_from_plan,
    write_qdq,
)

WEIGHT_MATMULS = ("q_proj", "k_proj", "v_proj", "fc1", "fc2", "lm_head")
INT8_FUSED = {"QLinearMatMul", "MatMulIntegerToFloat"}


def _recipe(model: onnx.ModelProto, config: PlanConfig) -> Recipe:
    # This machine's CPU class: the tests run the QDQ models through ORT's fused kernels.
    # Attention (activation x activation) needs the full-range class; its test is structural.
    caps = ORT_CPU_CAPS if config.quantize_attention else target_caps("ort-cpu")
    plan = make_plan(model, config, caps)
    scales = absmax_scales(model, feeds_for(model), [q.tensor for q in plan.activations])
    return recipe_from_plan(plan, scales, model_sha256(model), 0, config.to_dict())


def _qdq(model: onnx.ModelProto, **config: object) -> onnx.ModelProto:
    return write_qdq(model, _recipe(model, PlanConfig(**config)))  # type: ignore[arg-type]


def _optimized(model: onnx.ModelProto, tmp_path: Path) -> onnx.ModelProto:
    """The model after ORT's extended graph optimisation (what the ort-cpu target saves)."""
    path = tmp_path / "optimized.onnx"
    session(model, str(path))
    return onnx.load(str(path))


def _default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _dq_fed_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMuls still reading a DequantizeLinear output (i.e. not fused)."""
    dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul" and any(i in dq_outputs for i in n.input)
    ]


@pytest.mark.parametrize(
    ("bits", "opset", "ir", "tolerance"),
    [(8, 17, 8, 0.05), (4, 21, 10, 0.25), (2, 25, 13, 0.8)],
)
def test_qdq_model_is_valid_runs_and_is_close(
    bits: int, opset: int, ir: int, tolerance: float
) -> None:
    model = speech_model()
    qdq = _qdq(model, weight_bits=bits)
    onnx.checker.check_model(qdq, full_check=True)
    assert (_default_opset(qdq), qdq.ir_version) == (opset, ir)
    feeds = feeds_for(model)
    errors = [rel_l2(q, f) for q, f in zip(run(qdq, feeds), run(model, feeds), strict=True)]
    assert max(errors) < tolerance, errors
    if bits == 2:
        assert max(errors) > 0.05  # 2-bit is lossy; a tiny error would mean nothing happened


def test_int8_matmuls_fuse_to_integer_kernels(tmp_path: Path) -> None:
    optimized = _optimized(_qdq(speech_model()), tmp_path)
    ops = {n.name: n.op_type for n in optimized.graph.node}
    for name in WEIGHT_MATMULS:  # the shared LayerNorm output (q/k/v) included
        assert ops[name] in INT8_FUSED, (name, ops[name])
    assert _dq_fed_matmuls(optimized) == []


def test_int8_attention_fuses_too(tmp_path: Path) -> None:
    optimized = _optimized(_qdq(speech_model(), quantize_attention=True), tmp_path)
    fused = [n for n in optimized.graph.node if n.op_type in INT8_FUSED]
    assert len(fused) == len(WEIGHT_MATMULS) + 2  # + QK^T and AV
    assert not [n for n in optimized.graph.node if "MatMul" in n.op_type and n not in fused]


@pytest.mark.parametrize("bits", [4, 2])
def test_block_matmuls_fuse_to_matmulnbits(bits: int, tmp_path: Path) -> None:
    optimized = _optimized(_qdq(speech_model(), weight_bits=bits), tmp_path)
    nbits = [n for n in optimized.graph.node if n.op_type == "MatMulNBits"]
    assert all(n.domain == "com.microsoft" for n in nbits)
    assert len(nbits) == len(WEIGHT_MATMULS)  # lm_head's weight is shared with a Gather
    for node in nbits:
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs["bits"] == bits and attrs["block_size"] == 32
    assert _dq_fed_matmuls(optimized) == []


def test_int8_weight_only_fuses_to_matmulnbits(tmp_path: Path) -> None:
    optimized = _optimized(_qdq(speech_model(), activation_bits=None), tmp_path)
    nbits = [n for n in optimized.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == len(WEIGHT_MATMULS)
    assert all({a.name: a.i for a in n.attribute}["bits"] == 8 for n in nbits)


def test_zero_points_are_zero_and_weights_have_none() -> None:
    qdq = _qdq(speech_model(), weight_bits=4, quantize_attention=True, symmetric_blocks=True)
    inits = {t.name: t for t in qdq.graph.initializer}
    checked = 0
    for node in qdq.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            assert len(node.input) == 2, node.name  # weight: zero point omitted (= 0)
            continue
        zero_point = inits[node.input[2]]
        assert zero_point.data_type == TensorProto.INT8
        assert not numpy_helper.to_array(zero_point).any()
        checked += 1
    assert checked > 0


def test_weights_replaced_and_every_reader_dequantizes() -> None:
    model = speech_model()
    qdq = _qdq(model, weight_bits=4)
    inits = {t.name: t for t in qdq.graph.initializer}
    for name in ("q.w", "fc1.w", "E", "conv.w", "o.w"):
        assert name not in inits  # no float copy left
    assert inits["E_quantized_0"].data_type == TensorProto.INT4
    assert inits["conv.w_quantized"].data_type == TensorProto.INT8  # INT8 fallback
    nodes = {n.name: n for n in qdq.graph.node}
    # E has two readers (lm_head, then the Gather): one DQ each. The weight-only MatMul
    # gets a private copy of the integers (MatMulNBits fusion needs one); on ort-cpu the
    # Gather reads its own INT8 copy (ORT's Gather has no 4-bit kernel).
    assert nodes["lm_head"].input[1] == "E_dequantized_0"
    assert nodes["embed"].input[0] == "E_dequantized_1"
    assert list(nodes["E_DequantizeLinear_0"].input) == ["E_quantized_0", "E_scale_0",
                                                         "E_zero_point_0"]
    assert list(nodes["E_DequantizeLinear_1"].input) == ["E_quantized_1", "E_scale_1"]
    assert inits["E_quantized_1"].data_type == TensorProto.INT8
    assert list(inits["E_scale_0"].dims) == [2, 64]  # [ceil(K / 32), N]
    assert {a.name: a.i for a in nodes["E_DequantizeLinear_0"].attribute} == {
        "axis": 0, "block_size": 32}
    assert {a.name: a.i for a in nodes["E_DequantizeLinear_1"].attribute} == {
        "axis": 1, "block_size": 32}  # blocks along the Gather's rows
    assert {a.name: a.i for a in nodes["o.w_DequantizeLinear"].attribute} == {"axis": 0}
    # Without the Gather copy (TensorRT caps) the Gather shares one float32-scaled copy.
    config = PlanConfig(weight_bits=4)
    plan = make_plan(model, config, TENSORRT_CAPS)
    scales = absmax_scales(model, feeds_for(model), [q.tensor for q in plan.activations])
    trt = write_qdq(model, recipe_from_plan(plan, scales, model_sha256(model), 0,
                                            config.to_dict()))
    inits = {t.name: t for t in trt.graph.initializer}
    nodes = {n.name: n for n in trt.graph.node}
    assert list(nodes["E_DequantizeLinear_1"].input) == ["E_quantized", "E_scale"]
    assert inits["E_quantized_0"].raw_data == inits["E_quantized"].raw_data
    assert list(inits["E_scale"].dims) == [2, 64]


def test_activation_qdq_feeds_only_its_consumers() -> None:
    qdq = _qdq(speech_model())
    nodes = {n.name: n for n in qdq.graph.node}
    assert nodes["fc1"].input[0] == "res_dequantized"
    assert nodes["residual2"].input[0] == "res"  # the float residual path stays float
    # A tensor with several quantized consumers: one Q -> DQ pair each (see qdq.py).
    for k, consumer in enumerate(("q_proj", "k_proj", "v_proj")):
        assert nodes[consumer].input[0] == f"ln_dequantized_{k}"
        q = nodes[f"ln_QuantizeLinear_{k}"]
        assert list(q.input) == ["ln", f"ln_scale_{k}", f"ln_zero_point_{k}"]


def test_same_recipe_and_model_give_identical_bytes() -> None:
    model = speech_model()
    recipe = _recipe(model, PlanConfig(weight_bits=4, quantize_attention=True))
    first = write_qdq(model, recipe).SerializeToString()
    assert write_qdq(speech_model(), recipe).SerializeToString() == first
    replayed = Recipe.from_json(recipe.to_json())
    assert write_qdq(model, replayed).SerializeToString() == first


def test_input_model_is_not_modified() -> None:
    model = versioned_ops_model()
    before = model.SerializeToString()
    write_qdq(model, _recipe(model, PlanConfig(weight_bits=2)))
    assert model.SerializeToString() == before


@pytest.mark.parametrize(("bits", "opset"), [(8, 17), (4, 21), (2, 25)])
def test_opset_upgrade_converts_fp32_ops_first(bits: int, opset: int) -> None:
    """ReduceMean (axes attribute -> input at 18), Split, LayerNorm survive the upgrade."""
    model = versioned_ops_model()
    qdq = _qdq(model, weight_bits=bits)
    onnx.checker.check_model(qdq, full_check=True)
    assert _default_opset(qdq) == opset
    feeds = feeds_for(model)
    assert rel_l2(run(qdq, feeds)[0], run(model, feeds)[0]) < (0.05 if bits == 8 else 0.8)
    if opset >= 18:
        mean = next(n for n in qdq.graph.node if n.op_type == "ReduceMean")
        assert len(mean.input) == 2 and "axes" not in {a.name for a in mean.attribute}


def test_old_opset_is_raised_to_13_for_per_channel_int8() -> None:
    model = mlp_model()
    model.opset_import[0].version = 11
    model.ir_version = 6
    qdq = _qdq(model)
    assert _default_opset(qdq) == 13 and qdq.ir_version == 7
    feeds = feeds_for(model)
    assert rel_l2(run(qdq, feeds)[0], run(model, feeds)[0]) < 0.05


def test_nan_scale_in_recipe_json_names_the_tensor() -> None:
    model = mlp_model()
    recipe = _recipe(model, PlanConfig())
    envelope = json.loads(recipe.to_json())
    entry = next(t for t in envelope["_data"]["tensors"] if t["tensor"] == "r")
    entry["scale"] = float("nan")
    with pytest.raises(SfcError, match="activation scale for 'r'"):
        Recipe.from_json(json.dumps(envelope))


def test_recipe_must_match_the_model() -> None:
    model = mlp_model()
    recipe = _recipe(model, PlanConfig())
    other = mlp_model(seed=5)
    with pytest.raises(SfcError, match="recipe was made for model"):
        write_qdq(other, recipe)
    write_qdq(other, recipe, verify_model=False)  # same graph, other weights: allowed


def test_recipe_naming_missing_things_is_a_user_error() -> None:
    model = mlp_model()
    recipe = _recipe(model, PlanConfig())
    broken = model.__class__()
    broken.CopyFrom(model)
    broken.graph.node[3].name = "renamed"
    with pytest.raises(SfcError, match=r"consumer 'mm2' of '(r|W2)' is not in the model"):
        write_qdq(broken, recipe, verify_model=False)
    clash = model.__class__()
    clash.CopyFrom(model)
    clash.graph.node[2].output[0] = "W1_quantized"
    clash.graph.node[3].input[0] = "W1_quantized"
    with pytest.raises(SfcError, match="'W1_quantized' already exists"):
        write_qdq(clash, _recipe(clash, PlanConfig()))


def test_nan_weight_names_the_weight() -> None:
    model = mlp_model()
    recipe = _recipe(model, PlanConfig())
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[0, 0] = np.nan
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W1"))
    with pytest.raises(SfcError, match="weight 'W1' has NaN"):
        write_qdq(model, recipe, verify_model=False)


def test_int8_tied_weight_keeps_one_integer_copy(tmp_path: Path) -> None:
    """Private copies are only for weight-only MatMuls (the MatMulNBits candidates)."""
    qdq = _qdq(speech_model())
    inits = {t.name for t in qdq.graph.initializer}
    assert {"E_quantized", "E_scale"} <= inits
    assert not {"E_quantized_0", "E_quantized_1"} & inits
    ops = {n.name: n.op_type for n in _optimized(qdq, tmp_path).graph.node}
    assert ops["lm_head"] in INT8_FUSED


def test_int2_odd_n_falls_back_and_stays_accurate(tmp_path: Path) -> None:
    """ORT 1.31 fuses INT2 with N % 4 != 0 into a wrong MatMulNBits; placement avoids it."""
    model = mlp_model()
    w2 = numpy_helper.to_array(model.graph.initializer[2])[:, :63].copy()
    model.graph.initializer[2].CopyFrom(numpy_helper.from_array(w2, "W2"))
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info("y"))
    qdq = _qdq(model, weight_bits=2, activation_bits=None)
    feeds = feeds_for(model)
    fused = session(qdq, str(tmp_path / "opt.onnx")).run(None, feeds)[0]
    unfused = session(qdq, optimize=False).run(None, feeds)[0]
    assert rel_l2(fused, unfused) < 0.01
    assert rel_l2(unfused, run(model, feeds)[0]) < 0.8


def test_upgraded_model_keeps_no_trace_of_float_weights() -> None:
    qdq = _qdq(versioned_ops_model(), weight_bits=4)
    names = {v.name for v in qdq.graph.value_info} | {t.name for t in qdq.graph.initializer}
    assert not {"W1", "W2"} & names
    assert {"W1_quantized", "W2_quantized"} <= names
