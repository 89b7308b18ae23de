"""Placement: which tensors get quantizers, with which spec, and why the rest stay float."""

from __future__ import annotations

import dataclasses

import onnx
import pytest
from test_quant_graphs import mlp_model, speech_model

from sfc.errors import SfcError
from sfc.quant import (
    ORT_CPU_CAPS,
    ORT_CPU_SATURATING_CAPS,
    TENSORRT_CAPS,
    PlanConfig,
    QuantSpec,
    TargetCaps,
    make_plan,
    name_nodes,
)
from sfc.quant.plan import STRUCTURAL_OPS, check_caps


def _by_tensor(plan):  # type: ignore[no-untyped-def]
    return {q.tensor: q for q in plan.quantizers}


def _reasons(plan) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {s.node: s.reason for s in plan.skipped}


def test_int8_placement_on_weighted_ops() -> None:
    plan = make_plan(speech_model(), PlanConfig(), ORT_CPU_CAPS)
    q = _by_tensor(plan)
    # Weights: per-channel on the output-channel axis of each op.
    assert q["conv.w"].spec == QuantSpec(8, "channel", axis=0)
    for name in ("q.w", "k.w", "v.w", "fc1.w", "fc2.w", "E"):
        assert q[name].spec == QuantSpec(8, "channel", axis=1), name
    assert q["o.w"].spec == QuantSpec(8, "channel", axis=0)  # Gemm transB=1: B is [N, K]
    assert q["o.w"].op_types == ("Gemm",)
    # Activations: per-tensor INT8 on the data inputs, one quantizer per tensor.
    tensor8 = QuantSpec(8, "tensor")
    for name in ("feats", "ln", "ctx2d", "res", "act", "enc"):
        assert q[name].kind == "activation" and q[name].spec == tensor8, name
    assert q["ln"].consumers == ("q_proj", "k_proj", "v_proj")
    assert q["ln"].op_types == ("MatMul",) * 3
    assert q["E"].consumers == ("lm_head",)  # the Gather reads it too, but stays float
    # Graph order: a node's activations, then its weight.
    assert [x.tensor for x in plan.quantizers] == [
        "feats", "conv.w", "ln", "q.w", "k.w", "v.w", "ctx2d", "o.w",
        "res", "fc1.w", "act", "fc2.w", "enc", "E",
    ]  # fmt: skip


def test_everything_else_stays_float_with_a_reason() -> None:
    plan = make_plan(speech_model(), PlanConfig(), ORT_CPU_CAPS)
    reasons = _reasons(plan)
    assert "quantize_attention" in reasons["attn_qk"]
    assert "quantize_attention" in reasons["attn_av"]
    assert "float" in reasons["ln"] and "float" in reasons["softmax"]
    assert "Gather" in reasons["embed"]
    assert "Erf" in reasons["act"]  # an op with no quantized kernel
    # Every node with arithmetic is accounted for exactly once: quantized consumer or
    # skipped; only shape/data-movement ops go unlisted.
    model = speech_model()
    consumers = {c for q in plan.quantizers for c in q.consumers}
    assert consumers.isdisjoint(reasons)
    unlisted = {n.name for n in model.graph.node} - consumers - set(reasons)
    assert all(n.op_type in STRUCTURAL_OPS for n in model.graph.node if n.name in unlisted)
    assert [s.node for s in plan.skipped] == [n.name for n in model.graph.node if n.name in reasons]


def test_quantize_attention_adds_both_inputs() -> None:
    plan = make_plan(speech_model(), PlanConfig(quantize_attention=True), ORT_CPU_CAPS)
    q = _by_tensor(plan)
    assert q["q"].consumers == ("attn_qk",) and q["kt"].consumers == ("attn_qk",)
    assert q["probs"].consumers == ("attn_av",) and q["v"].consumers == ("attn_av",)
    assert "attn_qk" not in _reasons(plan)


def test_attention_needs_activation_bits() -> None:
    config = PlanConfig(activation_bits=None, quantize_attention=True)
    plan = make_plan(speech_model(), config, ORT_CPU_CAPS)
    assert not plan.activations
    assert "activation_bits" in _reasons(plan)["attn_qk"]


def test_exclude_patterns() -> None:
    plan = make_plan(speech_model(), PlanConfig(exclude=("fc*", "conv")), ORT_CPU_CAPS)
    reasons = _reasons(plan)
    assert reasons["fc1"] == "excluded by pattern 'fc*'"
    assert reasons["fc2"] == "excluded by pattern 'fc*'"
    assert reasons["conv"] == "excluded by pattern 'conv'"
    q = _by_tensor(plan)
    for name in ("fc1.w", "fc2.w", "act", "res", "conv.w", "feats"):
        assert name not in q, name
    assert "q.w" in q


def test_weight_shared_with_excluded_node_stays_float() -> None:
    model = mlp_model()
    model.graph.node[3].input[1] = "W1x"  # mm2 reads a second weight ...
    w1 = onnx.numpy_helper.to_array(model.graph.initializer[0])
    model.graph.initializer.append(onnx.numpy_helper.from_array(w1.T.copy(), "W1x"))
    model.graph.node.append(onnx.helper.make_node("MatMul", ["x", "W1"], ["z"], name="mm3"))
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info("z"))
    plan = make_plan(model, PlanConfig(exclude=("mm3",)), ORT_CPU_CAPS)
    assert plan.get("W1") is None
    assert "shared with excluded node 'mm3'" in _reasons(plan)["mm1"]
    assert plan.get("W1x") is not None


def test_int4_blocks_on_matmul_and_int8_fallback_with_reason() -> None:
    plan = make_plan(speech_model(), PlanConfig(weight_bits=4, block_size=32), ORT_CPU_CAPS)
    q = _by_tensor(plan)
    for name in ("q.w", "k.w", "v.w", "fc1.w", "fc2.w", "E"):
        assert q[name].spec == QuantSpec(4, "block", axis=0, block_size=32,
                                         zero_point=True), name
        assert "weight-only" in q[name].note
    # Conv and Gemm are not in ort-cpu's block_weight_ops: INT8 per-channel, and why.
    assert q["conv.w"].spec == QuantSpec(8, "channel", axis=0)
    assert "no block-quantized Conv" in q["conv.w"].note
    assert q["o.w"].spec == QuantSpec(8, "channel", axis=0)
    assert "no block-quantized Gemm" in q["o.w"].note
    # Block MatMuls take float activations (MatMulNBits); INT8 ops keep theirs.
    assert {x.tensor for x in plan.activations} == {"feats", "ctx2d"}


def test_placement_reads_caps_not_target_names() -> None:
    caps = dataclasses.replace(
        ORT_CPU_CAPS, name="anything", block_weight_ops=frozenset({"MatMul", "Gemm"})
    )
    q = _by_tensor(make_plan(speech_model(), PlanConfig(weight_bits=4), caps))
    # K is axis 1 of [N, K]
    assert q["o.w"].spec == QuantSpec(4, "block", axis=1, block_size=32, zero_point=True)
    old = dataclasses.replace(ORT_CPU_CAPS, max_opset=20)
    q = _by_tensor(make_plan(speech_model(), PlanConfig(weight_bits=4), old))
    assert q["q.w"].spec == QuantSpec(8, "channel", axis=1)
    assert "needs opset 21" in q["q.w"].note
    with_acts = dataclasses.replace(ORT_CPU_CAPS, block_weight_only=False)
    plan = make_plan(speech_model(), PlanConfig(weight_bits=4), with_acts)
    assert plan.get("ln") is not None


def test_target_without_requested_bits_is_a_user_error() -> None:
    trt_like = TargetCaps(
        "trt-like", frozenset({4, 8}), frozenset({8}), frozenset({"MatMul"}), max_opset=21
    )
    with pytest.raises(SfcError, match="does not run 2-bit weights"):
        make_plan(mlp_model(), PlanConfig(weight_bits=2), trt_like)
    no_acts = dataclasses.replace(trt_like, activation_bits=frozenset())
    with pytest.raises(SfcError, match="8-bit activations"):
        make_plan(mlp_model(), PlanConfig(), no_acts)


def test_weight_shared_by_conflicting_layouts() -> None:
    model = mlp_model()
    # A Gemm transB=1 reading W2 [128, 64] as [N, K]: output axis 0, the MatMul's is 1.
    model.graph.node.append(
        onnx.helper.make_node("Gemm", ["x2", "W2"], ["z"], name="gemm", transB=1)
    )
    model.graph.input.append(onnx.helper.make_tensor_value_info("x2", 1, [4, 64]))
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info("z"))
    plan = make_plan(model, PlanConfig(), ORT_CPU_CAPS)
    assert plan.get("W2") is None and plan.get("r") is None
    reasons = _reasons(plan)
    assert "different axes" in reasons["mm2"] and "different axes" in reasons["gemm"]


def test_non_constant_and_odd_weights_are_skipped() -> None:
    model = mlp_model()
    model.graph.input.append(onnx.helper.make_tensor_value_info("W1", 1, [64, 128]))
    plan = make_plan(model, PlanConfig(), ORT_CPU_CAPS)  # W1 is now an overridable input
    assert plan.get("W1") is None and "attention" in _reasons(plan)["mm1"]
    model = mlp_model()
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info("W2"))
    assert "graph output" in _reasons(make_plan(model, PlanConfig(), ORT_CPU_CAPS))["mm2"]


def test_node_names_are_required_and_name_nodes_fixes_them() -> None:
    model = mlp_model()
    model.graph.node[1].name = ""
    with pytest.raises(SfcError, match=r"node 1 \(Add\) has no name"):
        make_plan(model, PlanConfig(), ORT_CPU_CAPS)
    model.graph.node[1].name = "mm1"
    with pytest.raises(SfcError, match="used twice"):
        make_plan(model, PlanConfig(), ORT_CPU_CAPS)
    named = name_nodes(model)
    assert len({n.name for n in named.graph.node}) == 4
    assert model.graph.node[1].name == "mm1"  # input untouched
    make_plan(named, PlanConfig(), ORT_CPU_CAPS)


def test_plan_is_deterministic() -> None:
    config = PlanConfig(weight_bits=4, quantize_attention=True)
    assert make_plan(speech_model(), config, ORT_CPU_CAPS) == make_plan(
        speech_model(), config, ORT_CPU_CAPS
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight_bits": 3}, "weight_bits"),
        ({"activation_bits": 2}, "activation_bits"),
        ({"block_size": 24}, "block_size"),
        ({"block_size": 8}, "block_size"),
        ({"exclude": "fc*"}, "exclude"),
    ],
)
def test_plan_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(SfcError, match=message):
        PlanConfig(**kwargs)


def test_plan_config_round_trip() -> None:
    config = PlanConfig(weight_bits=2, activation_bits=None, exclude=("a*",))
    assert PlanConfig.from_dict(config.to_dict()) == config
    with pytest.raises(SfcError, match="unknown plan settings: bogus"):
        PlanConfig.from_dict({"bogus": 1})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((3, "tensor"), "bits"),
        ((8, "row"), "granularity"),
        ((8, "channel"), "needs an axis"),
        ((8, "tensor", 0), "neither axis"),
        ((4, "block", 0), "power of two"),
        ((4, "block", 0, 48), "power of two"),
        ((4, "block", 0, 8), "power of two"),
        ((4, "block", None, 32), "needs an axis"),
        ((8, "channel", -1), "non-negative"),
        ((8, "tensor", None, None, 128), "pair_limit"),
        ((8, "channel", 0, None, 0), "pair_limit"),
    ],
)
def test_quant_spec_validation(args: tuple, message: str) -> None:
    with pytest.raises(SfcError, match=message):
        QuantSpec(*args)


def test_quant_spec_ranges_and_json() -> None:
    assert [(QuantSpec(b, "tensor").qmin, QuantSpec(b, "tensor").qmax) for b in (8, 4, 2)] == [
        (-128, 127), (-8, 7), (-2, 1),
    ]  # fmt: skip
    spec = QuantSpec(2, "block", axis=0, block_size=64)
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    paired = QuantSpec(8, "channel", axis=1, pair_limit=128)
    assert (paired.qmin, paired.qmax) == (-128, 127)  # full range; only pairs are limited
    assert QuantSpec.from_dict(paired.to_dict()) == paired
    assert "pairs <= 128" in paired.describe()
    # A recipe written before pair_limit existed loads without one.
    old = {"bits": 8, "granularity": "channel", "axis": 1, "block_size": None}
    assert QuantSpec.from_dict(old) == QuantSpec(8, "channel", axis=1)
    with pytest.raises(SfcError, match="malformed"):
        QuantSpec.from_dict({**old, "zero": 3})
    # Zero points: block specs of 4/2 bits only; JSON key only when set; the carried range.
    zp = QuantSpec(4, "block", axis=0, block_size=32, zero_point=True)
    assert zp.to_dict()["zero_point"] is True and "zero_point" not in spec.to_dict()
    assert QuantSpec.from_dict(zp.to_dict()) == zp
    assert (zp.span, zp.int_bounds, spec.int_bounds) == (15, (-15, 15), (-2, 1))
    for bad in ({**old, "zero_point": True}, {**old, "zero_point": 3}):
        with pytest.raises(SfcError, match="zero points are for 4/2-bit block"):
            QuantSpec.from_dict(bad)


def test_symmetric_blocks_turn_zero_points_off_and_tensorrt_never_gets_them() -> None:
    model = speech_model()
    for caps, config, zero in ((ORT_CPU_CAPS, PlanConfig(weight_bits=4), True),
                               (ORT_CPU_CAPS, PlanConfig(weight_bits=4, symmetric_blocks=True),
                                False),
                               (TENSORRT_CAPS, PlanConfig(weight_bits=4), False)):
        q = _by_tensor(make_plan(model, config, caps))
        assert q["q.w"].spec.zero_point is zero, (caps.name, config)
    config = PlanConfig(weight_bits=4, symmetric_blocks=True)
    assert config.to_dict()["symmetric_blocks"] is True
    assert "symmetric_blocks" not in PlanConfig().to_dict()
    assert PlanConfig.from_dict(config.to_dict()) == config


def test_avx2_class_limits_int8_weight_pairs_and_takes_attention() -> None:
    plan = _by_tensor(make_plan(mlp_model(), PlanConfig(), ORT_CPU_SATURATING_CAPS))
    assert plan["W1"].spec == QuantSpec(8, "channel", axis=1, pair_limit=128)
    assert plan["x"].spec == QuantSpec(8, "tensor")  # activations keep all 8 bits
    # Attention's operands are both activations: ORT runs them u8 x u8, exact without VNNI
    # (tests/test_targets_ort_cpu.py checks the lowered kernel).
    check_caps(PlanConfig(quantize_attention=True), ORT_CPU_SATURATING_CAPS)


def test_int2_needs_last_dim_multiple_of_4_on_ort_cpu() -> None:
    model = mlp_model()
    w2 = onnx.numpy_helper.to_array(model.graph.initializer[2])[:, :63].copy()
    model.graph.initializer[2].CopyFrom(onnx.numpy_helper.from_array(w2, "W2"))
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info("y"))
    q = _by_tensor(make_plan(model, PlanConfig(weight_bits=2), ORT_CPU_CAPS))
    assert q["W1"].spec.bits == 2  # N = 128
    assert q["W2"].spec == QuantSpec(8, "channel", axis=1)  # N = 63
    assert "last dim (63) a multiple of 4" in q["W2"].note
    q = _by_tensor(make_plan(model, PlanConfig(weight_bits=4), ORT_CPU_CAPS))
    assert q["W2"].spec.bits == 4
    with pytest.raises(SfcError, match="int pairs"):
        dataclasses.replace(ORT_CPU_CAPS, block_last_dim_multiple=((2, 0),))
