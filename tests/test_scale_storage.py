"""Float16 block scales and the Gathers' own INT8 copy of a tied table (ort-cpu caps)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_quant_graphs import feeds_for, run, session, speech_model

from sfc.check.graph import GraphView
from sfc.check.profiles import resolve_profile
from sfc.check.rules import ScaleRule
from sfc.errors import SfcError
from sfc.precision.budget import storage_bits
from sfc.quant import (
    ORT_CPU_CAPS,
    TENSORRT_CAPS,
    PlanConfig,
    QuantSpec,
    Recipe,
    make_plan,
    model_sha256,
    recipe_from_plan,
    write_qdq,
)
from sfc.quant.weights import dequantize_weight, quantize_weight, weight_scales
from sfc.targets.ort_rewrites import apply_rewrites

HALF = QuantSpec(4, "block", axis=0, block_size=32, scale_bits=16)


def test_float16_scales_are_block_only_and_round_trip() -> None:
    with pytest.raises(SfcError, match="block quantizers only"):
        QuantSpec(8, "channel", axis=1, scale_bits=16)
    with pytest.raises(SfcError, match="32 or 16"):
        QuantSpec(4, "block", axis=0, block_size=32, scale_bits=8)
    assert QuantSpec.from_dict(HALF.to_dict()) == HALF
    # float32 specs keep their earlier JSON (recipes replay byte for byte)
    assert "scale_bits" not in replace(HALF, scale_bits=32).to_dict()


@pytest.mark.parametrize("method", ["absmax", "mse"])
def test_float16_scales_are_stored_values_and_cost_little(method: str) -> None:
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((256, 96)) * 0.05).astype(np.float32)
    w[:32, 0] = 0.0  # an all-zero block still gets a positive scale
    half = weight_scales(w, HALF, method)
    assert np.array_equal(half, half.astype(np.float16).astype(np.float32))
    assert (half > 0).all()
    full_spec = replace(HALF, scale_bits=32)
    full = weight_scales(w, full_spec, method)

    def err(spec: QuantSpec, s: np.ndarray) -> float:
        return float(np.square(dequantize_weight(quantize_weight(w, spec, s), spec, s) - w).sum())

    assert err(HALF, half) <= err(full_spec, full) * 1.01


def test_storage_bits_count_the_stored_scale_width() -> None:
    shape = (512, 64)  # 16 blocks of 32 per column
    assert storage_bits(shape, HALF) / (512 * 64) == pytest.approx(4.5)
    assert storage_bits(shape, replace(HALF, scale_bits=32)) / (512 * 64) == pytest.approx(5.0)


def _w4_recipe(model: onnx.ModelProto, caps=ORT_CPU_CAPS) -> Recipe:  # type: ignore[no-untyped-def]
    config = PlanConfig(weight_bits=4, activation_bits=None, block_size=16)
    plan = make_plan(model, config, caps)
    return recipe_from_plan(plan, {}, model_sha256(model), 0, config.to_dict())


def test_plan_gives_ort_cpu_half_scales_and_a_gather_copy_but_not_tensorrt() -> None:
    model = speech_model()
    ort_recipe = {t.tensor: t for t in _w4_recipe(model).tensors}
    table = ort_recipe["E"]
    assert table.spec.granularity == "block" and table.spec.scale_bits == 16
    assert table.gather_spec == QuantSpec(8, "channel", axis=0)  # the Gather's axis
    assert ort_recipe["fc1.w"].gather_spec is None  # no Gather reads it
    text = _w4_recipe(model).to_json()
    assert Recipe.from_json(text).to_json() == text
    trt = {t.tensor: t for t in _w4_recipe(model, TENSORRT_CAPS).tensors}
    assert trt["E"].spec.scale_bits == 32 and trt["E"].gather_spec is None


def test_qdq_stores_float16_scales_runs_and_fuses(tmp_path: Path) -> None:
    model = speech_model()
    qdq = write_qdq(model, _w4_recipe(model))
    halves = [t for t in qdq.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert {t.name for t in halves} >= {"fc1.w_scale_float16", "fc2.w_scale_float16"}
    casts = [n for n in qdq.graph.node if n.op_type == "Cast"]
    assert {n.output[0] for n in casts} >= {"fc1.w_scale", "fc2.w_scale"}
    onnx.checker.check_model(qdq, full_check=True)
    # Plain ONNX semantics equal a numpy DQ of the stored values...
    feeds = feeds_for(model)
    plain = session(qdq, optimize=False).run(["emb"], feeds)[0]
    table = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "E"))
    spec8 = QuantSpec(8, "channel", axis=0)
    s8 = weight_scales(table, spec8, "absmax")
    rows = dequantize_weight(quantize_weight(table, spec8, s8), spec8, s8)[feeds["ids"]]
    np.testing.assert_allclose(plain, rows, rtol=0, atol=1e-6)
    # ...and ORT still folds the Cast and fuses the block weights into MatMulNBits.
    path = tmp_path / "opt.onnx"
    session(qdq, str(path))
    fused = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert fused.count("MatMulNBits") >= 4 and "Cast" not in fused


def test_gather_copy_is_int8_from_the_float_table_and_closer_than_the_blocks() -> None:
    model = speech_model()
    recipe = _w4_recipe(model)
    qdq = write_qdq(model, recipe)
    feeds = feeds_for(model)
    emb = run(qdq, feeds)[1]
    float_emb = run(model, feeds)[1]
    plain = replace(recipe, tensors=tuple(replace(t, gather_spec=None) for t in recipe.tensors))
    shared = write_qdq(model, plain)
    shared_emb = run(shared, feeds)[1]
    assert np.abs(emb - float_emb).max() < np.abs(shared_emb - float_emb).max() / 3
    # The ort-cpu rewrite takes the INT8 per-channel copy as it is (its exact path).
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(qdq)
    assert apply_rewrites(rewritten)["gather-of-dequantized"] == 1
    np.testing.assert_array_equal(run(rewritten, feeds)[1], emb)


def test_check_accepts_cast_scales_for_ort_but_not_tensorrt() -> None:
    model = speech_model()
    view = GraphView.of(write_qdq(model, _w4_recipe(model)))
    assert "fc1.w_scale" in view.cast_constants
    ort_findings = list(ScaleRule().check(view, resolve_profile("ort-cpu")))
    assert ort_findings == []
    trt = [f for f in ScaleRule().check(view, resolve_profile("tensorrt:10.16"))
           if "Cast of a constant" in f.message]
    assert trt and all(f.severity == "error" for f in trt)
