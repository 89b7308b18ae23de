"""`sfc check`: each portability rule on a small handmade graph (one violation per test), a
clean graph per target, ONNX Runtime's own quantizer output, sfc's writer output, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_quant_graphs import absmax_scales, feeds_for, mlp_model, speech_model

from sfc.check import (
    MODEL_NODE,
    PROFILES,
    RULES,
    CheckReport,
    Finding,
    check_model,
    resolve_profile,
)
from sfc.errors import SfcError
from sfc.quant import (
    ORT_CPU_CAPS,
    TENSORRT_CAPS,
    PlanConfig,
    TargetCaps,
    make_plan,
    model_sha256,
    recipe_from_plan,
    write_qdq,
)

K, N = 16, 8
TARGETS = ("tensorrt:10.3", "tensorrt:10.16", "tensorrt:11", "ort-cpu")
TRT = TARGETS[:3]
node = helper.make_node
RNG = np.random.default_rng(0)


# --- graph builders -------------------------------------------------------------------

def f32(name: str, values: object) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, np.float32), name)


def typed(name: str, data_type: int, values: object) -> onnx.TensorProto:
    arr = np.asarray(values)
    return helper.make_tensor(name, data_type, arr.shape, vals=arr.ravel())


def act_qdq(src: str, *, zp: object = 0, zp_type: int = TensorProto.INT8, scale: object = 0.05,
            **attrs: Any) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """Q -> DQ of activation `src` (nodes `<src>_Q`, `<src>_DQ`); zp None: no zero point."""
    inits = [f32(f"{src}_s", scale)]
    params = [f"{src}_s"]
    if zp is not None:
        inits.append(typed(f"{src}_zp", zp_type, zp))
        params.append(f"{src}_zp")
    nodes = [node("QuantizeLinear", [src, *params], [f"{src}_q"], name=f"{src}_Q", **attrs),
             node("DequantizeLinear", [f"{src}_q", *params], [f"{src}_dq"], name=f"{src}_DQ",
                  **attrs)]
    return nodes, inits, f"{src}_dq"


def weight_dq(name: str, values: object, scale: object, data_type: int = TensorProto.INT8,
              **attrs: Any) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """DQ (node `<name>_DQ`) of an integer initializer, no zero point (as sfc writes)."""
    inits = [typed(f"{name}_q", data_type, values), f32(f"{name}_s", scale)]
    nodes = [node("DequantizeLinear", [f"{name}_q", f"{name}_s"], [f"{name}_dq"],
                  name=f"{name}_DQ", **attrs)]
    return nodes, inits, f"{name}_dq"


def graph(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], *, opset: int = 17,
          ir: int = 8, x_shape: tuple[int, ...] = (1, 4, K),
          extra: list[onnx.ValueInfoProto] | None = None,
          opsets: tuple[tuple[str, int], ...] = ()) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    g = helper.make_graph(nodes, "g", [x, *(extra or [])], [y], inits)
    ids = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in opsets)]
    model = helper.make_model(g, opset_imports=ids)
    model.ir_version = ir
    return model


def int8_weight(shape: tuple[int, ...] = (K, N)) -> np.ndarray:
    return RNG.integers(-127, 128, shape).astype(np.int8)


def w8a8(*, act: dict[str, Any] | None = None, w_axis: int = 1,
         w_scale: object = None) -> onnx.ModelProto:
    """x -> Q/DQ (INT8 per-tensor) -> MatMul with DQ(W INT8 [K, N] per-channel axis 1)."""
    n1, i1, xdq = act_qdq("x", **(act or {}))
    scale = np.full(N, 0.01) if w_scale is None else w_scale
    n2, i2, wdq = weight_dq("W", int8_weight(), scale, axis=w_axis)
    return graph([*n1, *n2, node("MatMul", [xdq, wdq], ["y"], name="mm")], [*i1, *i2])


def w4a16(*, shape: tuple[int, int] = (K, N), block: int = 16, axis: int = 0,
          data_type: int = TensorProto.INT4, scale_shape: tuple[int, ...] | None = None,
          opset: int = 21, ir: int = 10) -> onnx.ModelProto:
    """x -> MatMul with DQ(W block-quantized along K): weight-only, float activations."""
    k, n = shape
    values = RNG.integers(-2 if data_type == TensorProto.INT2 else -8, 2, shape)
    blocks = -(-k // block)
    default = (blocks, n) if axis == 0 else (k, -(-n // block))
    scale = np.full(scale_shape or default, 0.02)
    n1, i1, wdq = weight_dq("W", values, scale, data_type, axis=axis, block_size=block)
    return graph([*n1, node("MatMul", ["x", wdq], ["y"], name="mm")], i1, opset=opset, ir=ir,
                 x_shape=(1, 4, k))


# --- assertions -----------------------------------------------------------------------

def found(model: onnx.ModelProto, target: str, severity: str,
          arch: str | None = None) -> set[tuple[str, str]]:
    """{(rule, node)} of the findings of one severity."""
    report = check_model(model, target, arch=arch)
    return {(f.rule, f.node) for f in report.findings if f.severity == severity}


def errors(model: onnx.ModelProto, target: str, arch: str | None = None) -> set[tuple[str, str]]:
    return found(model, target, "error", arch)


def only(model: onnx.ModelProto, target: str, rule: str) -> Finding:
    """The one finding of `model` on `target`, which must be of `rule`."""
    report = check_model(model, target)
    relevant = [f for f in report.findings if f.rule != "known-issue"]
    assert [f.rule for f in relevant] == [rule], [f.line() for f in relevant]
    return relevant[0]


# --- clean graphs ---------------------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
def test_clean_w8a8_graph_passes_every_target(target: str) -> None:
    report = check_model(w8a8(), target)
    assert report.passed
    assert [f for f in report.findings if f.severity != "info"] == []
    expected_info = {("known-issue", MODEL_NODE)} if target == "tensorrt:10.16" else set()
    assert {(f.rule, f.node) for f in report.findings} == expected_info


def test_clean_w4a16_graph_passes_with_target_specific_warnings() -> None:
    model = w4a16()
    assert check_model(model, "tensorrt:11").findings == ()
    assert check_model(model, "ort-cpu").findings == ()
    assert found(model, "tensorrt:10.16", "warning") == {("int4-unconfirmed", MODEL_NODE)}
    # 10.3: INT4's opset 21 is above the opset 20 documented for TensorRT 10.0
    assert found(model, "tensorrt:10.3", "warning") == {("int4-unconfirmed", MODEL_NODE),
                                                        ("opset-ir", MODEL_NODE)}
    assert found(model, "tensorrt:10.16", "warning", arch="sm_110") == set()  # Thor
    for target in TARGETS:
        assert errors(model, target) == set()


def test_rule_ids_are_unique_and_explained() -> None:
    ids = [rule.id for rule in RULES]
    assert len(set(ids)) == len(ids)
    assert all(rule.why and rule.__doc__ for rule in RULES)


# --- zero points and types ------------------------------------------------------------

def test_nonzero_zero_point_is_an_error_on_tensorrt_only() -> None:
    model = w8a8(act={"zp": 3})
    for target in TRT:
        assert errors(model, target) == {("zero-point", "x_Q"), ("zero-point", "x_DQ")}
    assert errors(model, "ort-cpu") == set()
    finding = next(f for f in check_model(model, "tensorrt:11").findings if f.node == "x_Q")
    assert "TensorRT only supports symmetric quantization" in finding.message
    assert "sfc build" in finding.fix


def test_zero_point_that_is_not_a_constant_is_an_error() -> None:
    n1, i1, xdq = act_qdq("x")
    i1 = [i for i in i1 if i.name != "x_zp"]  # the zero point becomes a graph input
    zp_in = helper.make_tensor_value_info("x_zp", TensorProto.INT8, [])
    n2, i2, wdq = weight_dq("W", int8_weight(), np.full(N, 0.01), axis=1)
    model = graph([*n1, *n2, node("MatMul", [xdq, wdq], ["y"], name="mm")], [*i1, *i2],
                  extra=[zp_in])
    assert errors(model, "tensorrt:10.16") == {("zero-point", "x_Q"), ("zero-point", "x_DQ")}


def test_quantize_without_zero_point_is_uint8_and_an_error_on_tensorrt() -> None:
    model = w8a8(act={"zp": None})  # ONNX: no zero point and no output_dtype -> UINT8
    assert errors(model, "tensorrt:10.3") == {("unsigned-type", "x_Q"),
                                              ("unsigned-type", "x_DQ")}
    assert errors(model, "ort-cpu") == set()


def test_int32_bias_dequantize_is_not_a_tensorrt_type() -> None:
    n1, i1, bdq = weight_dq("b", np.arange(N), 0.001, TensorProto.INT32)
    n2, i2, wdq = weight_dq("W", int8_weight(), np.full(N, 0.01), axis=1)
    nodes = [*n1, *n2, node("MatMul", ["x", wdq], ["h"], name="mm"),
             node("Add", ["h", bdq], ["y"], name="bias")]
    model = graph(nodes, [*i1, *i2])
    finding = only(model, "tensorrt:10.16", "quant-type")
    assert (finding.severity, finding.node) == ("error", "b_DQ")
    assert "QuantizeBias" in finding.fix
    assert errors(model, "ort-cpu") == set()


def test_fp4_is_absent_from_tensorrt_10_3() -> None:
    values = np.full((K, N), 0.5, np.float32)
    n1, i1, wdq = weight_dq("W", values, np.full((1, N), 0.1), TensorProto.FLOAT4E2M1,
                            axis=0, block_size=16)
    model = graph([*n1, node("MatMul", ["x", wdq], ["y"], name="mm")], i1, opset=23, ir=11)
    finding = only(model, "tensorrt:11", "fp8-arch")  # FP4 needs sm_100; device unknown
    assert finding.severity == "warning"
    assert errors(model, "tensorrt:10.3") == {("quant-type", "W_DQ")}
    assert "10.8" in next(f.fix for f in check_model(model, "tensorrt:10.3").findings
                          if f.rule == "quant-type")


# --- scales ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf")])
def test_bad_scale_values_are_errors_everywhere(bad: float) -> None:
    model = w8a8(act={"scale": bad})
    for target in TARGETS:
        assert errors(model, target) == {("scale", "x_Q"), ("scale", "x_DQ")}, target


def test_scale_that_is_a_graph_input_errs_on_tensorrt_and_warns_on_ort() -> None:
    n1, i1, xdq = act_qdq("x")
    i1 = [i for i in i1 if i.name != "x_s"]
    scale_in = helper.make_tensor_value_info("x_s", TensorProto.FLOAT, [])
    n2, i2, wdq = weight_dq("W", int8_weight(), np.full(N, 0.01), axis=1)
    model = graph([*n1, *n2, node("MatMul", [xdq, wdq], ["y"], name="mm")], [*i1, *i2],
                  extra=[scale_in])
    assert errors(model, "tensorrt:11") == {("scale", "x_Q"), ("scale", "x_DQ")}
    assert errors(model, "ort-cpu") == set()
    assert found(model, "ort-cpu", "warning") == {("scale", "x_Q"), ("scale", "x_DQ")}


def test_two_dimensional_scale_without_block_size_is_an_error() -> None:
    model = w8a8(w_scale=np.full((1, N), 0.01))
    assert errors(model, "tensorrt:10.16") == {("scale", "W_DQ")}


def test_per_channel_scale_length_must_match_the_axis() -> None:
    model = w8a8(w_scale=np.full(N + 1, 0.01))
    assert errors(model, "ort-cpu") == {("scale", "W_DQ")}


# --- per-channel ----------------------------------------------------------------------

def test_per_channel_scale_on_an_activation_is_an_error_on_tensorrt() -> None:
    model = w8a8(act={"scale": np.full(K, 0.05), "zp": np.zeros(K, np.int8), "axis": -1})
    assert errors(model, "tensorrt:10.3") == {("per-channel", "x_Q"), ("per-channel", "x_DQ")}
    assert errors(model, "ort-cpu") == set()


def test_matmul_weight_per_channel_axis_must_be_n() -> None:
    model = w8a8(w_axis=0, w_scale=np.full(K, 0.01))
    finding = only(model, "tensorrt:10.16", "per-channel")
    assert (finding.severity, finding.node) == ("error", "W_DQ")
    assert "axis 1" in finding.fix
    assert errors(model, "ort-cpu") == set()


@pytest.mark.parametrize(("trans_b", "axis", "bad"), [(1, 0, False), (1, 1, True),
                                                      (0, 1, False), (0, 0, True)])
def test_gemm_weight_axis_follows_trans_b(trans_b: int, axis: int, bad: bool) -> None:
    shape = (N, K) if trans_b else (K, N)
    n1, i1, wdq = weight_dq("W", int8_weight(shape), np.full(shape[axis], 0.01), axis=axis)
    model = graph([*n1, node("Gemm", ["x", wdq], ["y"], name="gemm", transB=trans_b)], i1,
                  x_shape=(4, K))
    assert errors(model, "tensorrt:11") == ({("per-channel", "W_DQ")} if bad else set())


def test_conv_weight_per_channel_axis_must_be_zero() -> None:
    w = int8_weight((N, K, 3))
    n1, i1, wdq = weight_dq("W", w, np.full(K, 0.01), axis=1)
    model = graph([*n1, node("Conv", ["x", wdq], ["y"], name="conv")], i1, x_shape=(1, K, 10))
    assert errors(model, "tensorrt:10.16") == {("per-channel", "W_DQ")}


# --- block quantization ---------------------------------------------------------------

def test_int8_block_quantization_is_an_error_on_tensorrt_only() -> None:
    model = w4a16(data_type=TensorProto.INT8)
    for target in TRT:
        assert errors(model, target) == {("block", "W_DQ")}, target
    assert errors(model, "ort-cpu") == set()


def test_blocked_dimension_must_be_last_or_second_to_last() -> None:
    values = RNG.integers(-8, 8, (4, K, N))
    n1, i1, wdq = weight_dq("W", values, np.full((1, K, N), 0.02), TensorProto.INT4,
                            axis=0, block_size=16)
    model = graph([*n1, node("MatMul", ["x", wdq], ["y"], name="mm")], i1, opset=21, ir=10,
                  x_shape=(4, 4, K))
    assert errors(model, "tensorrt:11") == {("block", "W_DQ")}
    assert errors(model, "ort-cpu") == set()


def test_block_scale_must_block_exactly_one_dimension() -> None:
    model = w4a16(scale_shape=(1, 1))  # N is blocked too: two blocking dimensions
    for target in TARGETS:
        assert errors(model, target) == {("block", "W_DQ")}, target


def test_int4_tensor_needs_an_even_last_dimension_on_tensorrt() -> None:
    model = w4a16(shape=(K, N + 1))
    assert errors(model, "tensorrt:10.16") == {("int4-even", "W_DQ")}
    assert errors(model, "ort-cpu") == set()


# --- INT2 and sfc's plugin node ---------------------------------------------------------

def test_int2_is_an_error_on_tensorrt_with_a_version_specific_fix() -> None:
    model = w4a16(data_type=TensorProto.INT2, opset=25, ir=13)
    for target in TRT:
        assert errors(model, target) == {("sub4bit-type", "W_DQ")}, target
    assert "W2A16MatMul" in only(model, "tensorrt:11", "sub4bit-type").fix
    report = check_model(model, "tensorrt:10.3")
    assert "JetPack 7.2" in next(f.fix for f in report.findings if f.rule == "sub4bit-type")
    assert errors(model, "ort-cpu") == set()


def test_int2_block_weight_with_n_not_a_multiple_of_4_is_an_error_on_ort() -> None:
    model = w4a16(data_type=TensorProto.INT2, shape=(K, 6), opset=25, ir=13)
    finding = only(model, "ort-cpu", "ort-int2-fusion")
    assert (finding.severity, finding.node) == ("error", "W_DQ")
    assert "MatMulNBits" in finding.message


def test_full_range_int8_gemm_weights_are_an_error_on_ort_avx2_only(tmp_path: Path) -> None:
    full = _ort_quantize(mlp_model(), tmp_path, **_symmetric())
    assert _rules(full, "ort-cpu:avx2") == {"int8-saturation"}
    flagged = {n for rule, n in errors(full, "ort-cpu:avx2")}
    assert len(flagged) == 2  # both MatMul weights
    assert all("reduce_range" in f.fix for f in check_model(full, "ort-cpu:avx2").findings)
    for target in ("ort-cpu", "ort-cpu:vnni", "ort-cpu:arm64", "tensorrt:10.16"):
        assert "int8-saturation" not in _rules(full, target), target
    narrow = _ort_quantize(mlp_model(), tmp_path, reduce_range=True, **_symmetric())
    assert errors(narrow, "ort-cpu:avx2") == set()


def _plugin_model(namespace: str = "sfc") -> onnx.ModelProto:
    packed = numpy_helper.from_array(np.zeros(K * N // 4, np.uint8), "W_packed")
    plugin = node("W2A16MatMul", ["x", "W_packed", "W_s"], ["y"], name="mm",
                  domain="ai.onnx.contrib", K=K, N=N, block_size=16,
                  plugin_namespace=namespace, plugin_version="1")
    return graph([plugin], [packed, f32("W_s", np.full((1, N), 0.1))],
                 opsets=(("ai.onnx.contrib", 1),))


def test_sfc_plugin_node_needs_python_plugins() -> None:
    model = _plugin_model()
    finding = only(model, "tensorrt:10.3", "plugin")
    assert finding.severity == "error"
    assert finding.fix == ("build with the W8/W4 fallback for JetPack 6 or upgrade to JetPack "
                           "7.2 / TRT 10.16")
    assert found(model, "tensorrt:10.16", "info") == {("plugin", "mm")}
    assert errors(model, "tensorrt:10.16") == set()
    warning = only(model, "ort-cpu", "plugin")
    assert warning.severity == "warning"
    assert "onnxruntime-extensions" in warning.fix


def test_other_custom_ops_need_a_plugin_on_tensorrt() -> None:
    model = _plugin_model(namespace="someone_else")
    assert found(model, "tensorrt:10.16", "warning") == {("plugin", "mm")}


# --- versions, parser ops, FP8, INT4 activations ---------------------------------------

def test_opset_and_ir_version_against_each_profile() -> None:
    model = w8a8()
    model.opset_import[0].version = 26
    model.ir_version = 14
    assert errors(model, "ort-cpu") == {("opset-ir", MODEL_NODE)}  # IR 14: rejected
    ort = [f for f in check_model(model, "ort-cpu").findings if f.rule == "opset-ir"]
    assert sorted(f.severity for f in ort) == ["error", "warning"]  # opset 26 loads
    assert any("IR version 14" in f.message and f.severity == "error" for f in ort)
    # TensorRT 11 documents opset 25 (confirmed): an error; 10.16's limit is unconfirmed
    assert ("opset-ir", MODEL_NODE) in errors(model, "tensorrt:11")
    trt16 = [f for f in check_model(model, "tensorrt:10.16").findings if f.rule == "opset-ir"]
    assert [f.severity for f in trt16] == ["warning", "warning"]
    assert all("unconfirmed" in f.message for f in trt16)


@pytest.mark.parametrize(("op", "domain"), [("QLinearMatMul", ""), ("MatMulInteger", ""),
                                            ("ConvInteger", ""), ("DynamicQuantizeLinear", ""),
                                            ("MatMulNBits", "com.microsoft"),
                                            ("QGemm", "com.microsoft")])
def test_ops_the_tensorrt_parser_rejects(op: str, domain: str) -> None:
    opsets = (("com.microsoft", 1),) if domain else ()
    model = graph([node(op, ["x"], ["y"], name="q_op", domain=domain)], [], opsets=opsets)
    finding = only(model, "tensorrt:10.16", "parser-op")
    assert (finding.severity, finding.node) == ("error", "q_op")
    assert finding.fix == ("export QDQ (QuantFormat.QDQ) instead of QOperator / dynamic "
                           "quantization")
    assert check_model(model, "ort-cpu").findings == ()


def _fp8_model() -> onnx.ModelProto:
    n1, i1, xdq = act_qdq("x", zp=0.0, zp_type=TensorProto.FLOAT8E4M3FN)
    values = np.full((K, N), 0.5, np.float32)
    n2, i2, wdq = weight_dq("W", values, np.full(N, 0.01), TensorProto.FLOAT8E4M3FN, axis=1)
    return graph([*n1, *n2, node("MatMul", [xdq, wdq], ["y"], name="mm")], [*i1, *i2],
                 opset=19, ir=9)


def test_fp8_needs_sm89_and_arch_overrides_the_profile() -> None:
    model = _fp8_model()
    expected = {("fp8-arch", "x_Q"), ("fp8-arch", "x_DQ"), ("fp8-arch", "W_DQ")}
    assert errors(model, "tensorrt:10.16") == expected  # Orin sm_87
    assert errors(model, "tensorrt:10.16", arch="sm_90") == set()
    assert found(model, "tensorrt:11", "warning") == expected  # device unknown
    assert errors(model, "tensorrt:11", arch="sm_87") == expected


def test_int4_activation_quantizer_errs_on_tensorrt_and_warns_on_ort() -> None:
    n1, i1, xdq = act_qdq("x", zp=0, zp_type=TensorProto.INT4)
    n2, i2, wdq = weight_dq("W", int8_weight(), np.full(N, 0.01), axis=1)
    model = graph([*n1, *n2, node("MatMul", [xdq, wdq], ["y"], name="mm")], [*i1, *i2],
                  opset=21, ir=10)
    assert errors(model, "tensorrt:11") == {("int4-activation", "x_Q")}
    finding = only(model, "ort-cpu", "int4-activation")
    assert finding.severity == "warning"
    assert "fake quantization" in finding.message


# --- ONNX Runtime's quantizer ----------------------------------------------------------

def _ort_quantize(model: onnx.ModelProto, tmp_path: Path, **kw: Any) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Feeds(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([feeds_for(model, seed=s) for s in range(2)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    src, dst = tmp_path / "fp32.onnx", tmp_path / "quantized.onnx"
    onnx.save(model, str(src))
    quantize_static(str(src), str(dst), Feeds(), **kw)
    return onnx.load(str(dst))


def _rules(model: onnx.ModelProto, target: str) -> set[str]:
    return {rule for rule, _ in errors(model, target)}


def test_ort_default_quantization_is_asymmetric(tmp_path: Path) -> None:
    # onnxruntime 1.31's defaults: INT8 activations with calibrated non-zero zero points
    q = _ort_quantize(mlp_model(), tmp_path)
    assert _rules(q, "tensorrt:10.16") == {"zero-point"}
    assert errors(q, "ort-cpu") == set()


def test_ort_quint8_activations_are_unsigned_and_asymmetric(tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantType

    q = _ort_quantize(mlp_model(), tmp_path, activation_type=QuantType.QUInt8)
    assert _rules(q, "tensorrt:10.3") == {"zero-point", "unsigned-type"}
    assert errors(q, "ort-cpu") == set()


def _symmetric(**extra: object) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType

    return {"activation_type": QuantType.QInt8, "weight_type": QuantType.QInt8,
            "per_channel": True,
            "extra_options": {"ActivationSymmetric": True, "WeightSymmetric": True, **extra}}


def test_ort_symmetric_per_channel_mlp_passes_tensorrt(tmp_path: Path) -> None:
    q = _ort_quantize(mlp_model(), tmp_path, **_symmetric())
    for target in TARGETS:
        assert errors(q, target) == set(), target


def test_ort_symmetric_per_channel_speech_model_fires_exactly_these(tmp_path: Path) -> None:
    """ORT quantizes biases to INT32 DQs (no TensorRT type), and gives the Gather of the
    tied per-channel embedding E a per-channel Q/DQ on its output without an axis: an
    activation per-channel quantizer whose 64 scales do not match axis 1 (8 ids), which
    ONNX Runtime itself fails to run."""
    q = _ort_quantize(speech_model(), tmp_path, **_symmetric())
    assert errors(q, "tensorrt:10.16") == {
        ("quant-type", "conv.b_DequantizeLinear"), ("quant-type", "o.b_DequantizeLinear"),
        ("quant-type", "ln.b_DequantizeLinear"),
        ("per-channel", "emb_QuantizeLinear"), ("per-channel", "emb_DequantizeLinear"),
        ("scale", "emb_QuantizeLinear"), ("scale", "emb_DequantizeLinear")}
    assert _rules(q, "ort-cpu") == {"scale"}
    no_bias = _ort_quantize(speech_model(), tmp_path, **_symmetric(QuantizeBias=False))
    assert _rules(no_bias, "tensorrt:10.16") == {"per-channel", "scale"}


def test_ort_qoperator_format_is_rejected_by_tensorrt(tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantFormat

    q = _ort_quantize(mlp_model(), tmp_path, quant_format=QuantFormat.QOperator)
    rejected = {n for rule, n in errors(q, "tensorrt:11") if rule == "parser-op"}
    assert rejected == {n.name for n in q.graph.node if n.op_type.startswith("QLinear")}
    assert len(rejected) == 3  # two QLinearMatMul, one com.microsoft QLinearAdd
    assert errors(q, "ort-cpu") == set()


# --- sfc's own writer -----------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("caps", [ORT_CPU_CAPS, TENSORRT_CAPS], ids=lambda c: c.name)
def test_sfc_qdq_output_passes_its_targets(bits: int, caps: TargetCaps) -> None:
    model = speech_model()
    config = PlanConfig(weight_bits=bits, activation_bits=8)
    plan = make_plan(model, config, caps)
    scales = absmax_scales(model, feeds_for(model), [q.tensor for q in plan.activations])
    qdq = write_qdq(model, recipe_from_plan(plan, scales, model_sha256(model), 0,
                                            config.to_dict()))
    # ort-cpu gives a 4-bit tied table's Gather its own INT8 copy in blocks (exact on ORT),
    # which TensorRT does not block-quantize, and a zero point to every INT4 block weight,
    # which TensorRT rejects: those DQs, and only those, keep the file off TensorRT.
    ort_only: set[tuple[str, str]] = set()
    if caps.name == "ort-cpu" and bits == 4:
        ort_only = {("block", "E_DequantizeLinear_1")} | {
            ("zero-point", n.name) for n in qdq.graph.node
            if n.op_type == "DequantizeLinear" and len(n.input) == 3
            and n.input[0] in {i.name for i in qdq.graph.initializer}}
        assert len(ort_only) == 7  # q, k, v, fc1, fc2, the table's MatMul copy; the Gather's
    for target in ("tensorrt:10.16", "tensorrt:11", "ort-cpu"):
        expected = ort_only if target.startswith("tensorrt") else set()
        assert errors(qdq, target) == expected, target
    int4 = {n.input[0] for n in qdq.graph.node if n.op_type == "DequantizeLinear"} & {
        i.name for i in qdq.graph.initializer if i.data_type == TensorProto.INT4}
    assert bool(int4) == (bits == 4)  # the INT4 path was exercised
    warnings = found(qdq, "tensorrt:10.16", "warning")
    assert warnings == ({("int4-unconfirmed", MODEL_NODE)} if bits == 4 else set())


# --- profiles, reports, CLI -----------------------------------------------------------

def test_targets_and_arch_resolve() -> None:
    assert resolve_profile("tensorrt:10.16.2").name == "tensorrt:10.16"
    assert resolve_profile("TensorRT:11.0").name == "tensorrt:11"
    assert resolve_profile("tensorrt").name == "tensorrt:10.16"  # what sfc build targets
    assert resolve_profile("tensorrt:10.3", "sm_90").arch == 90
    assert resolve_profile("tensorrt:11", "8.9").arch == 89
    assert PROFILES["tensorrt:10.3"].arch == 87
    for bad, arch in [("tensorrt:9.2", None), ("tensorrt:10.4", None), ("onnx", None),
                      ("ort-cpu", "sm_90"), ("tensorrt:11", "turing")]:
        with pytest.raises(SfcError):
            resolve_profile(bad, arch)


def test_report_round_trips_through_json(tmp_path: Path) -> None:
    report = check_model(w8a8(act={"zp": 3}), "tensorrt:10.3")
    path = tmp_path / "report.json"
    report.save(path)
    assert CheckReport.load(path) == report
    data = json.loads(path.read_text())["_data"]
    assert data["counts"] == {"error": 2, "warning": 0, "info": 0}
    assert data["by_rule"] == {"zero-point": 2}
    assert not data["passed"]
    line = report.findings[0].line()
    assert line.startswith("error  zero-point  x_Q: zero point") and "(fix: " in line


def test_missing_and_corrupt_files_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(SfcError, match="not found"):
        check_model(tmp_path / "nope.onnx", "ort-cpu")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that protobuf cannot parse" * 10)
    with pytest.raises(SfcError, match="not a valid ONNX model"):
        check_model(bad, "ort-cpu")


def _sfc(*args: str) -> subprocess.CompletedProcess[str]:
    code = f"import sys\nfrom sfc.cli import main\nsys.argv = {['sfc', *args]!r}\nmain()"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)


def test_cli_prints_findings_and_exits_1_on_errors(tmp_path: Path) -> None:
    path = tmp_path / "asym.onnx"
    onnx.save(w8a8(act={"zp": 3}), str(path))
    out = tmp_path / "report.json"
    done = _sfc("check", str(path), "--target", "tensorrt:10.3", "--json", str(out))
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("error  zero-point  x_Q: ")
    assert lines[1].startswith("error  zero-point  x_DQ: ")
    assert "fails tensorrt:10.3 (sm_87): 2 errors, 0 warnings, 0 info" in lines[2]
    assert CheckReport.load(out).target == "tensorrt:10.3"


def test_cli_exits_0_on_a_clean_file(tmp_path: Path) -> None:
    path = tmp_path / "clean.onnx"
    onnx.save(w8a8(), str(path))
    done = _sfc("check", str(path), "--target", "tensorrt:11")
    assert done.returncode == 0, done.stderr
    assert "passes tensorrt:11: 0 errors" in done.stdout


@pytest.mark.parametrize("case", ["missing", "corrupt", "target"])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    path = tmp_path / "model.onnx"
    if case == "corrupt":
        path.write_bytes(b"not onnx at all")
    elif case == "target":
        onnx.save(w8a8(), str(path))
    target = "tensorrt:7" if case == "target" else "ort-cpu"
    done = _sfc("check", str(path), "--target", target)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
