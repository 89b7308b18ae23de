"""Float16 and 8-bit coded block scales (`QuantSpec.scale_bits` 16 and 8, `sfc build
--block-scales float16|coded8`): what the quantizers choose, what the budget counts, and what
`ort-cpu` stores and runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper
from test_quant_graphs import feeds_for, mlp_model

from sfc.errors import SfcError
from sfc.precision.budget import storage_bits
from sfc.quant import ORT_CPU_CAPS, PlanConfig, make_plan, model_sha256, recipe_from_plan
from sfc.quant.gptq import GptqConfig, gptq_quantize
from sfc.quant.qdq import write_qdq
from sfc.quant.spec import QuantSpec
from sfc.quant.stored import StoredWeights
from sfc.quant.weights import dequantize_weight, round_to_nearest, stored_scales, weight_scales
from sfc.targets.ort_cpu import OrtCpuTarget, compact_nbits_scales

ZP4 = QuantSpec(4, "block", axis=0, block_size=32, zero_point=True)
ZP4H = QuantSpec(4, "block", axis=0, block_size=32, zero_point=True, scale_bits=16)
SYM2H = QuantSpec(2, "block", axis=0, block_size=32, scale_bits=16)
ZP4C = QuantSpec(4, "block", axis=0, block_size=32, zero_point=True, scale_bits=8)


def _is_coded(a: np.ndarray) -> bool:
    """Each column (axis 1) is codes 1..255 times a float16 step = its largest value / 255."""
    step = a.max(axis=0, keepdims=True) / np.float32(255)
    codes = np.rint(a / step)
    return bool(_is_half(step) and codes.min() >= 1 and codes.max() <= 255
                and np.array_equal(codes.astype(np.float32) * step, a))


def _is_half(a: np.ndarray) -> bool:
    return bool(np.array_equal(a.astype(np.float16).astype(np.float32), a))


def _weights(seed: int = 0, shape: tuple[int, int] = (128, 48)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 0.05).astype(np.float32)


def test_stored_scales_round_to_float16_and_stay_positive() -> None:
    s = np.array([1e-9, 3e-5, 0.0123456789, 1e6], np.float32)
    half = stored_scales(s, ZP4H)
    assert half.dtype == np.float32 and _is_half(half) and (half > 0).all()
    assert half[-1] == 65504.0  # float16's largest finite value
    assert np.abs(half[2] / s[2] - 1) <= 2.0 ** -11
    assert np.array_equal(stored_scales(s, ZP4), s)


@pytest.mark.parametrize("method", ["absmax", "mse"])
def test_every_scale_method_picks_float16_values(method: str) -> None:
    w = _weights()
    for spec in (ZP4H, SYM2H):
        scales = weight_scales(w, spec, method)
        assert _is_half(scales), spec.describe()
    # A scale rounding of <= 2^-11 leaves the rounding error as it was (within 1%).
    full, half = (round_to_nearest(w, s, method) for s in (ZP4, ZP4H))
    err = [float(np.sum((dequantize_weight(q, s, sc) - w) ** 2)) for (q, sc), s in
           ((full, ZP4), (half, ZP4H))]
    assert abs(err[1] / err[0] - 1) < 0.01
    assert not _is_half(full[1])  # 32-bit scales are not rounded (this test could fail)


def test_gptq_scales_are_float16_values() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((256, 128)).astype(np.float32)
    w = _weights(3)
    for act_order in (False, True):
        _, scales = gptq_quantize(w, x.T @ x, x.shape[0], ZP4H, GptqConfig(act_order=act_order))
        assert _is_half(scales)


def test_the_budget_counts_16_bit_scales() -> None:
    assert storage_bits((64, 10), ZP4H) == 64 * 10 * 4 + 2 * 10 * (16 + 4)
    assert storage_bits((64, 10), SYM2H) == 64 * 10 * 2 + 2 * 10 * 16
    assert storage_bits((64, 10), ZP4H) / 640 == 4.625


def test_spec_and_plan_config_round_trip_and_refuse_bad_values() -> None:
    assert QuantSpec.from_dict(ZP4H.to_dict()) == ZP4H
    assert "scale_bits" not in ZP4.to_dict()  # recipes of earlier builds keep their bytes
    assert "float16 scales" in ZP4H.describe()
    with pytest.raises(SfcError, match="scale_bits"):
        QuantSpec(8, "channel", axis=1, scale_bits=16)
    with pytest.raises(SfcError, match="scale_bits"):
        QuantSpec(4, "block", axis=0, block_size=32, scale_bits=12)
    with pytest.raises(SfcError, match="block_scale_bits"):
        PlanConfig(block_scale_bits=24)
    config = PlanConfig(weight_bits=4, activation_bits=None, block_scale_bits=16)
    assert PlanConfig.from_dict(config.to_dict()) == config
    assert "block_scale_bits" not in PlanConfig().to_dict()


def test_the_plan_gives_block_weights_16_bit_scales_only() -> None:
    model = mlp_model()
    config = PlanConfig(weight_bits=4, activation_bits=None, block_scale_bits=16)
    plan = make_plan(model, config, ORT_CPU_CAPS)
    specs = [q.spec for q in plan.weights]
    assert specs and all(s.scale_bits == 16 for s in specs if s.granularity == "block")
    eight = make_plan(model, PlanConfig(weight_bits=8, block_scale_bits=16), ORT_CPU_CAPS)
    assert all(q.spec.scale_bits == 32 for q in eight.weights)


def test_stored_weights_must_hold_float16_scales() -> None:
    w = _weights(4, (64, 8))
    q, scales = round_to_nearest(w, ZP4)  # 32-bit scales under a 16-bit spec
    with pytest.raises(SfcError, match="not 16-bit values"):
        StoredWeights({"w": (q, scales)}).get("w", ZP4H, w.shape)
    q, scales = round_to_nearest(w, ZP4H)
    assert StoredWeights({"w": (q, scales)}).get("w", ZP4H, w.shape)[1] is scales


def test_coded_scales_are_codes_times_a_float16_step_per_column() -> None:
    w = _weights(5, (256, 24))
    w[:, 3] *= 40  # a column of much larger weights: its own step
    for method in ("absmax", "mse"):
        scales = weight_scales(w, ZP4C, method)
        assert scales.shape == (8, 24) and _is_coded(scales)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((512, 256)).astype(np.float32)
    for act_order in (False, True):  # group scales are fixed up front with codes
        _, scales = gptq_quantize(w, x.T @ x, x.shape[0], ZP4C, GptqConfig(act_order=act_order))
        assert _is_coded(scales)
    assert storage_bits((64, 10), ZP4C) == 64 * 10 * 4 + 2 * 10 * (8 + 4) + 10 * 16
    # Coding is idempotent, also where the step is a float16 subnormal (tiny scales).
    for low in (1e-2, 1e-6):
        raw = (rng.random((6, 50)) * low + low / 10).astype(np.float32)
        once = stored_scales(raw, ZP4C)
        assert _is_coded(once) and np.array_equal(stored_scales(once, ZP4C), once)
    full, coded = (round_to_nearest(w, s) for s in (ZP4, ZP4C))
    err = [float(np.sum((dequantize_weight(q, s, sc) - w) ** 2)) for (q, sc), s in
           ((full, ZP4), (coded, ZP4C))]
    assert err[1] / err[0] < 1.05  # codes cost little rounding error on these weights


def _lowered(tmp_path: Path, scale_bits: int) -> tuple[Path, onnx.ModelProto, Path]:
    model = mlp_model()
    config = PlanConfig(weight_bits=4, activation_bits=None, block_scale_bits=scale_bits)
    plan = make_plan(model, config, ORT_CPU_CAPS)
    recipe = recipe_from_plan(plan, {}, model_sha256(model), 0, config.to_dict())
    qdq = tmp_path / f"qdq{scale_bits}.onnx"
    onnx.save(write_qdq(model, recipe), str(qdq))
    out = tmp_path / f"out{scale_bits}"
    OrtCpuTarget().lower(qdq, out)
    return qdq, model, out


def test_ort_cpu_stores_float16_scales_and_runs_them_as_the_qdq_file(tmp_path: Path) -> None:
    qdq, model, out = _lowered(tmp_path, 16)
    saved = onnx.load(str(out / "model.ort.onnx"))
    nbits = [n for n in saved.graph.node if n.op_type == "MatMulNBits"]
    inits = {t.name: t for t in saved.graph.initializer}
    casts = {n.output[0]: n for n in saved.graph.node if n.op_type == "Cast"}
    assert nbits and all(inits[casts[n.input[2]].input[0]].data_type == TensorProto.FLOAT16
                         for n in nbits)
    feeds = feeds_for(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    got = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
           .run(None, feeds)[0] for p in (out / "model.ort.onnx", out / "model.ort", qdq)]
    assert np.array_equal(got[0], got[2]) and np.array_equal(got[1], got[2])
    # 8-bit codes: uint8 codes and float16 steps, the same outputs as their QDQ file.
    qdq8, _, out8 = _lowered(tmp_path, 8)
    saved8 = onnx.load(str(out8 / "model.ort.onnx"))
    kinds = [t.data_type for t in saved8.graph.initializer]
    assert TensorProto.UINT8 in kinds and "Reshape" in [n.op_type for n in saved8.graph.node]
    got8 = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
            .run(None, feeds)[0] for p in (out8 / "model.ort.onnx", qdq8)]
    assert np.array_equal(got8[0], got8[1])
    # float32 scales (not float16 values) are left as they are.
    _, _, out32 = _lowered(tmp_path, 32)
    saved32 = onnx.load(str(out32 / "model.ort.onnx"))
    assert not [n for n in saved32.graph.node if n.op_type == "Cast"]
    assert (out / "model.ort.onnx").stat().st_size < (out32 / "model.ort.onnx").stat().st_size


def test_compact_nbits_scales_touches_only_float16_valued_nbits_scales() -> None:
    scales = numpy_helper.from_array(np.array([0.1, 0.5], np.float32), "s")
    halves = numpy_helper.from_array(np.array([0.5, 0.25], np.float32), "h")
    other = numpy_helper.from_array(np.array([0.5], np.float32), "o")
    nodes = [onnx.helper.make_node("MatMulNBits", ["x", "b", "s"], ["y1"], domain="com.microsoft"),
             onnx.helper.make_node("MatMulNBits", ["x", "b", "h"], ["y2"], domain="com.microsoft"),
             onnx.helper.make_node("Mul", ["x", "o"], ["y3"])]
    graph = onnx.helper.make_graph(nodes, "g", [], [], [scales, halves, other])
    model = onnx.helper.make_model(graph)
    assert compact_nbits_scales(model) == {"coded8": 0, "float16": 1}
    kinds = {t.name: t.data_type for t in model.graph.initializer}
    assert kinds == {"s": TensorProto.FLOAT, "h_f16": TensorProto.FLOAT16,
                     "o": TensorProto.FLOAT}
    assert model.graph.node[0].op_type == "Cast" and model.graph.node[0].output[0] == "h"


def test_builds_store_float16_block_scales_on_ort_cpu_unless_told() -> None:
    from sfc.build import BuildConfig

    def bits(**kw: object) -> int:
        config = BuildConfig(weights=4, activations=None, calibrator="mse", **kw)  # type: ignore[arg-type]
        return config.plan_config().block_scale_bits

    assert bits() == 16  # ort-cpu (this CPU's class) stores them
    assert bits(target="sim") == 32 and bits(block_scale_bits=32) == 32
    with pytest.raises(SfcError, match="are for --target ort-cpu"):
        BuildConfig(weights=4, activations=None, target="sim", block_scale_bits=16)
