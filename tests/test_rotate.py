"""Hadamard rotations before low-bit weights (`sfc.quant.rotate`): which inputs they
rotate, that the rotated graph computes the same in FP32, that the plan keeps the rotation
float, and how a build records, replays and checks it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import scipy.linalg
from onnx import TensorProto, helper, numpy_helper

from sfc.build import BuildConfig
from sfc.errors import SfcError
from sfc.pipeline import compile_model
from sfc.quant.plan import PlanConfig, make_plan
from sfc.quant.rotate import PREFIX, Rotation, make_rotation, rotation_sites
from sfc.quant.spec import SIM_CAPS
from tests.conftest import model_with_feeds


def _model() -> onnx.ModelProto:
    """x[b, t, 64] -> LayerNorm (one outlier channel) -> MatMul w1, MatMul w2 (and the
    residual Add) -> w1's output -> MatMul w3 (48 rows: no whole Hadamard blocks); a tied
    table `emb` read by a Gather and a MatMul."""
    rng = np.random.default_rng(0)
    gamma = np.ones(64, np.float32)
    gamma[3] = 40.0
    inits = [numpy_helper.from_array(gamma, "gamma"),
             numpy_helper.from_array(np.zeros(64, np.float32), "beta"),
             numpy_helper.from_array(rng.standard_normal((64, 48)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal((48, 8)).astype(np.float32), "w3"),
             numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "emb"),
             numpy_helper.from_array(np.array([[1, 5]], np.int64), "ids")]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln",
                         axis=-1),
        helper.make_node("MatMul", ["ln", "w1"], ["h"], name="fc1"),
        helper.make_node("MatMul", ["ln", "w2"], ["o"], name="proj"),
        helper.make_node("Add", ["o", "ln"], ["res"], name="residual"),
        helper.make_node("MatMul", ["h", "w3"], ["y"], name="fc2"),
        helper.make_node("MatMul", ["res", "emb"], ["logits"], name="logits"),
        helper.make_node("Gather", ["emb", "ids"], ["rows"], name="embed", axis=0),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", 8]),
               helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "t", 32]),
               helper.make_tensor_value_info("rows", TensorProto.FLOAT, [1, 2, 32])]
    graph = helper.make_graph(
        nodes, "rot", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", 64])],
        outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def test_sites_are_matmul_inputs_with_whole_blocks_and_unshared_weights() -> None:
    # w3 has 48 rows; the table is also gathered; the residual Add still reads ln.
    assert rotation_sites(_model()) == {"ln": ("w1", "w2")}


def test_the_rotation_is_exact_in_fp32_and_stores_r_transpose_w() -> None:
    model = _model()
    rotation = make_rotation(model, 0)
    rotated = rotation.apply(model)
    onnx.checker.check_model(rotated)
    x = np.random.default_rng(1).standard_normal((2, 5, 64)).astype(np.float32)
    for a, b in zip(_run(model, x), _run(rotated, x), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # R = diag(signs) blockdiag(H), drawn as the benchmark screen drew it.
    signs = np.random.default_rng(0).choice([-1.0, 1.0], 64)
    assert np.array_equal(rotation.signs["ln"], signs)
    h = scipy.linalg.hadamard(32) / np.sqrt(32)
    r = np.diag(signs) @ scipy.linalg.block_diag(h, h)
    new = {t.name: numpy_helper.to_array(t) for t in rotated.graph.initializer}
    old = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_allclose(new["w2"], r.T @ old["w2"], atol=1e-5)
    assert np.array_equal(new["w3"], old["w3"]) and np.array_equal(new["emb"], old["emb"])
    # The caller's model is untouched, and a rotated model has nothing left to rotate.
    assert len(model.graph.node) == 7
    with pytest.raises(SfcError, match="no MatMul input to rotate"):
        make_rotation(rotated, 0)
    assert not np.array_equal(make_rotation(model, 1).signs["ln"], signs)


def test_unnamed_nodes_are_rotated_in_place() -> None:
    model = _model()
    for n in model.graph.node:
        n.name = ""
    rotated = make_rotation(model, 0).apply(model)
    onnx.checker.check_model(rotated)
    x = np.random.default_rng(3).standard_normal((1, 4, 64)).astype(np.float32)
    for a, b in zip(_run(model, x), _run(rotated, x), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_the_plan_keeps_the_hadamard_matmuls_float() -> None:
    rotated = make_rotation(_model(), 0).apply(_model())
    plan = make_plan(rotated, PlanConfig(weight_bits=4, activation_bits=None), SIM_CAPS)
    assert {q.tensor for q in plan.weights} >= {"w1", "w2"}
    assert not any(q.tensor.startswith(PREFIX) for q in plan.weights)
    skipped = {s.node: s.reason for s in plan.skipped}
    assert "Hadamard rotation" in skipped[f"{PREFIX}0/MatMul"]


def test_a_recipes_rotation_is_re_created_and_checked() -> None:
    model = _model()
    entry = make_rotation(model, 3).to_dict()
    assert entry["seed"] == 3 and entry["inputs"] == ["ln"] and entry["block"] == 32
    assert Rotation.from_dict(entry, model).digest() == entry["digest"]
    with pytest.raises(SfcError, match="does not match"):
        Rotation.from_dict({**entry, "seed": 4}, model)
    with pytest.raises(SfcError, match="malformed rotation"):
        Rotation.from_dict({"seed": "3"}, model)
    with pytest.raises(SfcError, match="cannot rotate"):
        Rotation(3, {"missing": np.ones(64, np.float32)}).apply(model)


def _source(tmp_path: Path) -> tuple[Path, Path]:
    return model_with_feeds(tmp_path, _model(), (1, 16, 64))


def test_a_build_rotates_records_and_replays(tmp_path: Path) -> None:
    src, feeds = _source(tmp_path)
    config = BuildConfig(target="sim", weights=2, activations=None, calib=feeds,
                         rotate=("all",))
    report = compile_model(str(src), tmp_path / "a", config, eval_data=None)
    folder = tmp_path / "a/model"
    recipe = json.loads((folder / "recipe.json").read_text())["_data"]
    entry = recipe["config"]["weights"]["rotation"]
    assert entry == make_rotation(_model(), 0).to_dict()
    text = (tmp_path / "a/report.md").read_text()
    assert "1 MatMul inputs Hadamard-rotated" in text
    assert ", and 1 Hadamard rotation MatMuls (32 x 32)" in text
    # Replay re-creates the rotation from the recipe: the same QDQ bytes, no data read.
    replay = replace(config, calib=tmp_path / "nowhere", recipe=tmp_path / "a", rotate=())
    compile_model(str(src), tmp_path / "b", replay, eval_data=None)
    for file in ("model.qdq.onnx", "recipe.json"):
        assert (folder / file).read_bytes() == (tmp_path / "b/model" / file).read_bytes()
    # The outlier channel costs 2-bit weights less once rotated.
    plain = compile_model(str(src), tmp_path / "c", replace(config, rotate=()),
                          eval_data=None)
    assert "rotation" not in json.loads(
        (tmp_path / "c/model/recipe.json").read_text())["_data"]["config"]["weights"]
    assert report.distortion is not None and plain.distortion is not None
    assert report.distortion.rel_l2["logits"] < plain.distortion.rel_l2["logits"]


def test_rotation_options_are_checked_before_calibration(tmp_path: Path) -> None:
    with pytest.raises(SfcError, match="applies to 4/2-bit weights"):
        BuildConfig(rotate=("all",))
    src, feeds = _source(tmp_path)
    config = BuildConfig(target="sim", weights=4, activations=None, calib=feeds,
                         rotate=("decoder",))
    with pytest.raises(SfcError, match="no graph 'decoder'"):
        compile_model(str(src), tmp_path / "a", config, eval_data=None)
    assert not (tmp_path / "a").exists()
