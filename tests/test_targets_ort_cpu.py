"""The ort-cpu target: QDQ models from ORT's quantizer lower to integer kernels.

Small graphs made with onnx.helper, quantized with onnxruntime.quantization.quantize_static
(QDQ, per-channel), lowered, and checked: the census shows the fused ops, the ORT-format
file loads and computes exactly what the optimized ONNX file computes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_quant_graphs import absmax_scales, feeds_for, session, speech_model

from sfc.build import target_caps
from sfc.card import ModelCard
from sfc.cpu import host_isa, isa_of
from sfc.errors import SfcError
from sfc.quant import (
    ORT_CPU_CAPS,
    ORT_CPU_SATURATING_CAPS,
    PlanConfig,
    TargetCaps,
    make_plan,
    model_sha256,
    recipe_from_plan,
    write_qdq,
)
from sfc.quant.weights import pairs_over
from sfc.targets import (
    LoweringResult,
    OrtCpuTarget,
    available_targets,
    canonical_target,
    fusion_census,
    get_target,
)
from sfc.targets.ort_cpu import NBITS_ACCURACY, weight_matmul_rows

RNG_SEED = 0


def _fp32_model() -> onnx.ModelProto:
    """x[n,64] -> MatMul -> +bias -> Relu -> MatMul -> y[n,16]; img -> Conv -> c."""
    rng = np.random.default_rng(RNG_SEED)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "B1"], ["hb"], name="bias"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2"),
        helper.make_node("Conv", ["img", "Wc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64]),
         helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16]),
         helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 4, 8, 8])],
        # 64x64 INT8 weights are 4 KiB: big enough to go to external data when asked.
        [init("W1", 64, 64), init("B1", 64), init("W2", 64, 16), init("Wc", 4, 3, 3, 3)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _feed(seed: int, n: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 64)).astype(np.float32),
            "img": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}


class _Reader:
    """quantize_static's CalibrationDataReader protocol over a few random batches."""

    def __init__(self) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = iter([_feed(s) for s in range(8)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:  # quantize_static may call it
        self._it = iter([_feed(s) for s in range(8)])


def _quantize(src: Path, dst: Path, **kwargs: object) -> Path:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    # reduce_range: 7-bit weights, exact in ORT's u8 x s8 kernels on every x86 CPU (without
    # VNNI full-range weights overflow int16; see ort-cpu:avx2).
    quantize_static(str(src), str(dst), _Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, reduce_range=True, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, **kwargs)
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The FP32 model, a fully quantized QDQ model, and a MatMul-only one with float outputs."""
    d = tmp_path_factory.mktemp("qdq")
    fp32 = d / "fp32.onnx"
    onnx.save(_fp32_model(), str(fp32))
    full = _quantize(fp32, d / "full.qdq.onnx")
    # MatMul outputs left float -> MatMulIntegerToFloat (and QGemm for MatMul + bias Add).
    mm = _quantize(fp32, d / "mm.qdq.onnx", op_types_to_quantize=["MatMul"],
                   extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"]})
    return {"fp32": fp32, "full": full, "mm": mm}


def _run(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in sess.run(None, feed)]


def test_full_qdq_lowers_to_qlinear(models: dict[str, Path], tmp_path: Path) -> None:
    res = OrtCpuTarget().lower(models["full"], tmp_path)
    assert res.fused.get("QLinearMatMul") == 2
    assert res.fused.get("QLinearConv") == 1
    assert res.float_weighted == ()
    assert res.artifact == "model.ort.onnx" and res.ort_format == "model.ort"
    assert res.bytes == (tmp_path / "model.ort.onnx").stat().st_size
    assert res.ort_format_bytes == (tmp_path / "model.ort").stat().st_size
    # Nothing but the two artifacts: no temp names or staging folders left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ort", "model.ort.onnx"]


def test_float_outputs_lower_to_matmul_integer_to_float(models: dict[str, Path],
                                                        tmp_path: Path) -> None:
    res = OrtCpuTarget().lower(models["mm"], tmp_path)
    assert res.fused.get("MatMulIntegerToFloat") == 1  # fc2
    assert res.fused.get("QGemm") == 1  # fc1 + bias
    assert res.float_weighted == ("conv",)  # not quantized: reported, not hidden


def test_ort_format_matches_optimized_onnx(models: dict[str, Path], tmp_path: Path) -> None:
    res = get_target("ort-cpu").lower(models["full"], tmp_path, stem="encoder")
    assert (res.artifact, res.ort_format) == ("encoder.ort.onnx", "encoder.ort")
    feed = _feed(123, n=3)
    opt = _run(tmp_path / res.artifact, feed)
    flat = _run(tmp_path / "encoder.ort", feed)
    qdq = _run(models["full"], feed)
    ref = _run(models["fp32"], feed)
    for a, b, q, r in zip(opt, flat, qdq, ref, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, q, rtol=0, atol=1e-5)  # lowering keeps QDQ numerics
        # INT8 is close to FP32 relative to the output's range (a sanity bound only).
        assert np.abs(a - r).max() < 0.1 * np.abs(r).max()


def test_block_int4_lowers_to_matmulnbits(tmp_path: Path) -> None:
    k, n, block = 64, 32, 32
    rng = np.random.default_rng(1)
    w = rng.integers(-8, 8, size=(k, n))
    wq = helper.make_tensor("Wq", TensorProto.INT4, [k, n], w.flatten().tolist())
    scale = numpy_helper.from_array(
        (rng.random((k // block, n)) * 0.1 + 0.01).astype(np.float32), "Ws")
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["Wq", "Ws"], ["W"], axis=0, block_size=block),
         helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        "int4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", n])], [wq, scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    src = tmp_path / "int4.onnx"
    onnx.save(model, str(src))
    res = OrtCpuTarget().lower(src, tmp_path / "out")
    assert res.fused == {"MatMulNBits": 1}
    assert res.dq_remaining == 0 and res.float_weighted == ()
    x = {"x": rng.standard_normal((2, k)).astype(np.float32)}
    np.testing.assert_allclose(_run(tmp_path / "out" / "model.ort", x)[0], _run(src, x)[0],
                               rtol=1e-4, atol=1e-4)


def _block_weight_model(x_shape: list[int | str], quantized: bool = True) -> onnx.ModelProto:
    """x -> MatMul with an INT4 block-32 weight [64, 32] (its DequantizeLinear; or the float
    weight it stands for, `quantized` False)."""
    k, n, block = 64, 32, 32
    rng = np.random.default_rng(1)
    w = rng.integers(-8, 8, size=(k, n))
    scale = (rng.random((k // block, n)) * 0.1 + 0.01).astype(np.float32)
    if quantized:
        inits = [helper.make_tensor("Wq", TensorProto.INT4, [k, n], w.flatten().tolist()),
                 numpy_helper.from_array(scale, "Ws")]
        nodes = [helper.make_node("DequantizeLinear", ["Wq", "Ws"], ["W"], axis=0,
                                  block_size=block)]
    else:
        inits = [numpy_helper.from_array((w * np.repeat(scale, block, 0)).astype(np.float32),
                                         "W")]
        nodes = []
    graph = helper.make_graph(
        [*nodes, helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "int4",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*x_shape[:-1], n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize(("isa", "x_shape", "level"), [
    ("avx2", [1, 512, 64], 0),  # an encoder-like call: many rows, float is faster there
    ("avx2", ["batch", "tokens", 64], 4),  # a decoder step: ORT's int8 default
    ("vnni", [1, 512, 64], 4),
])
def test_block_weights_run_float_on_avx2_when_calls_have_many_rows(
        tmp_path: Path, isa: str, x_shape: list[int | str], level: int) -> None:
    model = _block_weight_model(x_shape)
    rows = [512] if x_shape[1] == 512 else []  # symbolic rows are not counted
    # The FP32 graph ESC's sessions start from and the QDQ graph lowering reads agree.
    assert weight_matmul_rows(model) == weight_matmul_rows(
        _block_weight_model(x_shape, quantized=False)) == rows
    target = OrtCpuTarget(isa=isa)
    assert target.session_config(model) == ({NBITS_ACCURACY: "0"} if level == 0 else {})
    src = tmp_path / "int4.onnx"
    onnx.save(model, str(src))
    target.lower(src, tmp_path / "out")
    lowered = onnx.load(str(tmp_path / "out" / "model.ort.onnx"))
    assert [a.i for node in lowered.graph.node if node.op_type == "MatMulNBits"
            for a in node.attribute if a.name == "accuracy_level"] == [level]
    if level == 0:  # float activations times the dequantized weight: the QDQ graph itself
        x = {"x": np.random.default_rng(2).standard_normal((1, 512, 64)).astype(np.float32)}
        unfused = ort.SessionOptions()
        unfused.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        want = ort.InferenceSession(str(src), unfused).run(None, x)[0]
        np.testing.assert_allclose(_run(tmp_path / "out" / "model.ort", x)[0], want,
                                   rtol=1e-4, atol=1e-4)


def test_attention_matmuls_run_u8_by_u8_and_exact_on_avx2(tmp_path: Path) -> None:
    """Both operands of an attention MatMul are activations: ORT rewrites their s8 Q/DQ to
    u8 and fuses a u8 x u8 integer GEMM, whose kernel widens to int16 before multiplying,
    so saturated codes (pairs far over the AVX2 limit) give the QDQ graph's values."""
    heads, m, k, n = 2, 40, 64, 24
    nodes, inits = [], []
    for name in ("a", "b"):
        inits += [numpy_helper.from_array(np.array(0.02, np.float32), f"{name}_s"),
                  numpy_helper.from_array(np.array(0, np.int8), f"{name}_z")]
        nodes += [helper.make_node("QuantizeLinear", [name, f"{name}_s", f"{name}_z"],
                                   [f"{name}_q"]),
                  helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"],
                                   [f"{name}_d"])]
    graph = helper.make_graph(
        [*nodes, helper.make_node("MatMul", ["a_d", "b_d"], ["y"], name="qk")], "attention",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [heads, m, k]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [heads, k, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [heads, m, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    src = tmp_path / "attention.onnx"
    onnx.save(model, str(src))
    OrtCpuTarget(isa="avx2").lower(src, tmp_path / "out")
    lowered = onnx.load(str(tmp_path / "out" / "model.ort.onnx"))
    fused = [n for n in lowered.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(fused) == 1
    zero_points = {t.name: t.data_type for t in lowered.graph.initializer}
    assert [zero_points[z] for z in fused[0].input[4:6]] == [TensorProto.UINT8] * 2
    rng = np.random.default_rng(4)
    feed = {"a": (rng.standard_normal((heads, m, k)) * 3).astype(np.float32),  # codes +-127
            "b": (rng.standard_normal((heads, k, n)) * 3).astype(np.float32)}
    unfused = ort.SessionOptions()
    unfused.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(str(src), unfused).run(None, feed)[0]
    got = _run(tmp_path / "out" / "model.ort", feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)  # |y| reaches ~100


def test_whisper_graphs_take_the_rows_rule_at_their_usual_shapes(tiny_export: Path) -> None:
    """The export's encoder input has symbolic frames (`--encoder-window fit`): through the
    card, the rule sees a 30 s window (1500 rows) and the decoder's one token a step."""
    card = ModelCard.load(tiny_export)
    encoder = onnx.load(str(tiny_export / card.graphs["encoder"].path))
    decoder = onnx.load(str(tiny_export / card.graphs["decoder"].path))
    assert weight_matmul_rows(encoder) == []  # the bare graph's rows are all symbolic
    avx2 = OrtCpuTarget(isa="avx2")
    assert avx2.session_config(encoder) == {}
    enc = avx2.for_graph(card, "encoder")
    assert dict(enc.dims) == {"batch": 1, "frames": 3000}
    assert set(weight_matmul_rows(encoder, dict(enc.dims))) == {1500}
    assert enc.session_config(encoder) == {NBITS_ACCURACY: "0"}
    dec = avx2.for_graph(card, "decoder")
    assert dict(dec.dims)["tokens"] == 1 and dec.session_config(decoder) == {}
    vnni = OrtCpuTarget(isa="vnni").for_graph(card, "encoder")
    assert vnni.session_config(encoder) == {}  # the rule is AVX2's alone
    generic = ModelCard(name="m", family="generic", graphs=card.graphs, objective="distortion")
    assert avx2.for_graph(generic, "encoder") == avx2  # other models' dims stay unknown
    odd = replace(card, graphs={"encoder": replace(card.graphs["encoder"], inputs=(
        replace(card.graphs["encoder"].inputs[0], shape=("batch", 80, "samples")),))})
    assert avx2.for_graph(odd, "encoder") == avx2  # a dimension no Whisper rule knows
    assert [i.dim_param for i in encoder.graph.input[0].type.tensor_type.shape.dim] == \
        ["batch", "", "frames"]  # the caller's model is left as it was


def test_external_data_model(models: dict[str, Path], tmp_path: Path) -> None:
    src = tmp_path / "ext" / "qdq.onnx"
    src.parent.mkdir()
    onnx.save(onnx.load(str(models["full"])), str(src), save_as_external_data=True,
              location="qdq.onnx.data", size_threshold=0)
    out = tmp_path / "out"
    res = OrtCpuTarget().lower(src, out)
    data = out / "model.ort.onnx.data"
    assert data.is_file()
    assert res.bytes == (out / "model.ort.onnx").stat().st_size + data.stat().st_size
    feed = _feed(5)
    for a, b in zip(_run(out / "model.ort.onnx", feed), _run(out / "model.ort", feed),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_without_ort_format(models: dict[str, Path], tmp_path: Path) -> None:
    res = OrtCpuTarget(ort_format=False).lower(models["full"], tmp_path)
    assert res.ort_format is None and res.ort_format_bytes is None
    assert not (tmp_path / "model.ort").exists()


def test_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path: Path) -> None:
    with pytest.raises(SfcError, match="not found"):
        OrtCpuTarget().lower(tmp_path / "missing.onnx", tmp_path / "out")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a model\xff" * 10)
    with pytest.raises(SfcError) as info:
        OrtCpuTarget().lower(junk, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "out").glob("model.*"))


def test_registry() -> None:
    assert available_targets() == ("ort-cpu", "sim", "tensorrt")
    assert get_target("ort-cpu").name == f"ort-cpu:{host_isa()}"
    assert get_target("ORT-CPU:AVX2").name == "ort-cpu:avx2"
    assert get_target("ort-cpu:avx2").caps_name == "ort-cpu:avx2"
    assert get_target("ort-cpu:vnni").caps_name == get_target("ort-cpu:arm64").caps_name
    assert canonical_target("ort-cpu") == f"ort-cpu:{host_isa()}"
    assert canonical_target("tensorrt:10.3") == "tensorrt:10.3"
    with pytest.raises(SfcError, match=r"unknown ort-cpu CPU class 'sse2'.*ort-cpu:avx2"):
        get_target("ort-cpu:sse2")
    with pytest.raises(SfcError, match=r"unknown target 'tpu'; available: ort-cpu.*tensorrt"):
        get_target("tpu")


def test_lowering_result_round_trips(models: dict[str, Path], tmp_path: Path) -> None:
    res = OrtCpuTarget().lower(models["mm"], tmp_path)
    res.save(tmp_path / "lowering.json")
    assert LoweringResult.load(tmp_path / "lowering.json") == res
    bad = res.to_dict() | {"_version": 99}
    with pytest.raises(SfcError, match="version 99"):
        LoweringResult.from_dict(bad)
    with pytest.raises(SfcError, match="not a LoweringResult"):
        LoweringResult.from_dict({"_type": "BenchReport", "_version": 1, "_data": {}})


# --- fusion_census on hand-made graphs (no ORT involved) ---------------------------------

def _graph_model(nodes: list[onnx.NodeProto], inits: list[str]) -> onnx.ModelProto:
    tensors = [numpy_helper.from_array(np.ones((2, 2), np.float32), n) for n in inits]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [2, 2])],
                              [helper.make_tensor_value_info("y", 1, [2, 2])], tensors)
    return helper.make_model(graph)


def test_census_weighted_vs_activation_matmuls() -> None:
    model = _graph_model([
        helper.make_node("MatMul", ["x", "W"], ["a"], name="weight_mm"),
        helper.make_node("DequantizeLinear", ["Wq", "s"], ["Wd"], name="dq"),
        helper.make_node("Transpose", ["Wd"], ["Wt"], name="t"),
        helper.make_node("MatMul", ["a", "Wt"], ["b"], name="dq_weight_mm"),
        helper.make_node("MatMul", ["a", "b"], ["c"], name="attention_mm"),
        helper.make_node("Constant", [], ["k"], name="const",
                         value=numpy_helper.from_array(np.ones((2, 2), np.float32))),
        helper.make_node("Gemm", ["k", "c"], ["d"], name="const_gemm"),
        helper.make_node("Conv", ["d", "W"], ["y"], name="conv"),
    ], inits=["W", "Wq", "s"])
    c = fusion_census(model)
    assert c.float_weighted == ("weight_mm", "dq_weight_mm", "const_gemm", "conv")
    assert c.float_activation == ("attention_mm",)
    assert c.dq_remaining == 1 and c.q_remaining == 0 and c.fused == {}
    assert c.op_counts["MatMul"] == 3


def test_census_counts_fused_ops_and_subgraphs() -> None:
    then = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["t"], name="inner_mm"),
         helper.make_node("QLinearAdd", ["t"], ["t2"], domain="com.microsoft")],
        "then", [], [helper.make_tensor_value_info("t2", 1, [2, 2])])
    model = _graph_model([
        helper.make_node("QuantizeLinear", ["x", "s"], ["xq"]),
        helper.make_node("QLinearMatMul", ["xq"], ["m1"]),
        helper.make_node("MatMulNBits", ["x", "W"], ["m2"], domain="com.microsoft"),
        helper.make_node("MatMulNBits", ["x", "W"], ["m3"], domain="com.microsoft"),
        helper.make_node("DynamicQuantizeMatMul", ["x", "W"], ["m4"], domain="com.microsoft"),
        helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=then),
    ], inits=["W", "s"])
    c = fusion_census(model)
    assert c.fused == {"DynamicQuantizeMatMul": 1, "MatMulNBits": 2, "QLinearAdd": 2,
                       "QLinearMatMul": 1}
    # The outer initializer W is a constant inside both branches too.
    assert c.float_weighted == ("inner_mm", "inner_mm")
    assert c.q_remaining == 1


def test_ort_failure_leaves_nothing(tmp_path: Path) -> None:
    """A model ORT rejects (unknown op) is a one-line error; no output folder is left (an
    existing one keeps its files)."""
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"], domain="sfc.test")], "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("sfc.test", 1)])
    src = tmp_path / "bad.onnx"
    onnx.save(model, str(src))
    out = tmp_path / "out"
    with pytest.raises(SfcError, match="ONNX Runtime cannot load") as info:
        OrtCpuTarget().lower(src, out)
    assert "\n" not in str(info.value)
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("earlier output")
    with pytest.raises(SfcError, match="ONNX Runtime cannot load"):
        OrtCpuTarget().lower(src, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize(("machine", "flags", "isa"), [
    ("x86_64", ("avx2", "fma"), "avx2"),
    ("x86_64", ("avx2", "avx512f"), "avx2"),            # AVX-512 without VNNI saturates too
    ("x86_64", ("avx2", "avx512f", "avx512_vnni"), "vnni"),
    ("x86_64", ("avx2", "avx_vnni"), "vnni"),
    ("x86_64", (), "avx2"),                             # unknown flags: the safe side
    ("aarch64", ("asimddp",), "arm64"),
])
def test_cpu_class_follows_the_dot_product_instructions(machine: str, flags: tuple[str, ...],
                                                        isa: str) -> None:
    assert isa_of(machine, flags) == isa


def _int8_weight_values(qdq: onnx.ModelProto) -> np.ndarray:
    ints = [numpy_helper.to_array(t) for t in qdq.graph.initializer
            if t.data_type == TensorProto.INT8 and len(t.dims) == 2]
    return np.concatenate([w.ravel() for w in ints])


def _sfc_qdq(caps: TargetCaps) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    model = speech_model()
    plan = make_plan(model, PlanConfig(), caps)
    scales = absmax_scales(model, feeds_for(model), [q.tensor for q in plan.activations])
    recipe = recipe_from_plan(plan, scales, model_sha256(model), 0, PlanConfig().to_dict())
    return model, write_qdq(model, recipe)


def _fused_and_exact(qdq: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> tuple[Any, Any]:
    fused = session(qdq).run(None, feeds)  # ORT's default: the integer kernels
    exact = session(qdq, optimize=False).run(None, feeds)  # the QDQ semantics
    return fused[0], exact[0]


def test_avx2_class_keeps_every_weight_pair_within_int16() -> None:
    _, paired = _sfc_qdq(ORT_CPU_SATURATING_CAPS)
    assert _int8_weight_values(paired).max() > 63  # finer than 7-bit weights
    # Each weight's channel axis is its DQ's axis (MatMul [K, N]: 1; Gemm transB [N, K]: 0).
    ints = {t.name: numpy_helper.to_array(t) for t in paired.graph.initializer
            if t.data_type == TensorProto.INT8 and len(t.dims) == 2}
    axes = {n.input[0]: next(a.i for a in n.attribute if a.name == "axis")
            for n in paired.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in ints}
    assert len(axes) == len(ints) == 7 and set(axes.values()) == {0, 1}
    assert all(pairs_over(w, axes[name], 128) == 0 for name, w in ints.items())


def test_integer_kernels_equal_the_qdq_graph_for_this_cpu_class() -> None:
    """The contract ort-cpu keeps: on this machine's class, fusion changes no number."""
    model, qdq = _sfc_qdq(target_caps("ort-cpu"))
    fused, exact = _fused_and_exact(qdq, feeds_for(model))
    np.testing.assert_allclose(fused, exact, rtol=0, atol=1e-4)


@pytest.mark.skipif(host_isa() != "avx2", reason="needs an x86 CPU without VNNI")
def test_full_range_int8_weights_overflow_without_vnni() -> None:
    """Why ort-cpu:avx2 exists: here, full-range weights make the kernels disagree."""
    model, qdq = _sfc_qdq(ORT_CPU_CAPS)
    fused, exact = _fused_and_exact(qdq, feeds_for(model))
    assert np.abs(fused - exact).max() > 0.1
