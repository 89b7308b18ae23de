"""Activation smoothing (`sfc.quant.smooth`): which inputs it folds, that the fold is exact
in FP32, that it narrows the channel ranges, and how a build records and replays it."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sfc.build import BuildConfig, replay_source
from sfc.errors import SfcError
from sfc.pipeline import compile_model
from sfc.quant.smooth import (
    ChannelAbsMax,
    SmoothConfig,
    Smoothing,
    smooth_sites,
    smoothing_scales,
)
from tests.conftest import model_with_feeds


def _model(*, tied: bool = False, extra_reader: bool = False,
           vector_const: bool = False) -> onnx.ModelProto:
    """x[n, 64] -> LayerNorm (gamma with one outlier channel) -> MatMul w1, MatMul w2 (and
    Shape); w1's output -> Mul by 0.5 -> MatMul w3 -> y."""
    rng = np.random.default_rng(0)
    gamma = np.ones(64, np.float32)
    gamma[3] = 40.0
    inits = [numpy_helper.from_array(gamma, "gamma"),
             numpy_helper.from_array(rng.standard_normal(64).astype(np.float32) * 0.1, "beta"),
             numpy_helper.from_array(rng.standard_normal((64, 48)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((64, 16)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal((48, 8)).astype(np.float32), "w3")]
    half = np.full(48 if vector_const else (), 0.5, np.float32)
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln",
                         axis=-1),
        helper.make_node("Shape", ["ln"], ["ln_shape"], name="shape"),
        helper.make_node("MatMul", ["ln", "w1"], ["h"], name="fc1"),
        helper.make_node("MatMul", ["ln", "w2"], ["y2"], name="side"),
        helper.make_node("Constant", [], ["half"], name="half",
                         value=numpy_helper.from_array(half, "half")),
        helper.make_node("Mul", ["h", "half"], ["g"], name="gelu_mul"),
        helper.make_node("MatMul", ["g", "w1" if tied else "w3"], ["y"], name="fc2"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8]),
               helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["n", 16])]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["ln"], ["r"], name="relu"))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["n", 64]))
    graph = helper.make_graph(
        nodes, "smooth", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(model: onnx.ModelProto, x: np.ndarray, names: list[str]) -> list[np.ndarray]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names
                              if n not in present)
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(names, {"x": x})


def test_sites_are_layernorm_and_constant_mul_inputs_read_only_by_matmuls() -> None:
    sites = smooth_sites(_model(), ["ln", "g", "x", "h"])
    assert set(sites) == {"ln", "g"}  # x has no producer; h is read by a Mul
    assert sites["ln"].weights == ("w1", "w2") and sites["ln"].producer == "ln"
    assert sites["g"].weights == ("w3",) and sites["g"].producer == "gelu_mul"
    assert set(smooth_sites(_model(), ["g"])) == {"g"}  # only the tensors asked for
    assert "ln" not in smooth_sites(_model(extra_reader=True), ["ln", "g"])
    assert "g" not in smooth_sites(_model(vector_const=True), ["ln", "g"])
    tied = smooth_sites(_model(tied=True), ["ln", "g"])  # w1 read by two MatMuls
    assert "g" not in tied and "ln" not in tied


def test_scales_follow_smoothquant() -> None:
    xmax = np.array([4.0, 1.0, 0.0], np.float32)
    w = [np.array([[1.0, -2.0], [0.25, 0.5], [1.0, 1.0]]), np.array([[4.0], [0.1], [1.0]])]
    s = smoothing_scales(xmax, w, 0.5)
    assert np.allclose(s, [np.sqrt(4.0 / 4.0), np.sqrt(1.0 / 0.5), np.sqrt(1e-5 / 1.0)])
    assert np.allclose(smoothing_scales(xmax, w, 1.0), [4.0, 1.0, 1e-5])


def test_the_fold_is_exact_and_narrows_the_channel_ranges() -> None:
    model = _model()
    x = np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32)
    before = _run(model, x, ["y", "y2", "ln", "g"])
    accs = {t: ChannelAbsMax() for t in ("ln", "g")}
    for t, v in zip(("ln", "g"), before[2:], strict=True):
        accs[t].update(v)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    sites = smooth_sites(model, ["ln", "g"])
    smoothing = Smoothing({t: smoothing_scales(accs[t].result(),
                                               [inits[w] for w in sites[t].weights], 0.5)
                           for t in sites})
    smoothed = smoothing.apply(model)
    after = _run(smoothed, x, ["y", "y2", "ln", "g"])
    for a, b in zip(before[:2], after[:2], strict=True):
        assert np.allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(a).max())
    ratio = [float(v.max(0).max() / np.median(v.max(0))) for v in (np.abs(before[2]),
                                                                    np.abs(after[2]))]
    assert ratio[1] < ratio[0] / 3  # the outlier channel (gamma 40) is tamed
    assert np.allclose(np.abs(after[2]).max(0), accs["ln"].result() / smoothing.scales["ln"],
                       rtol=1e-4)
    # The caller's model is untouched; the fold is deterministic.
    assert np.array_equal(numpy_helper.to_array(model.graph.initializer[0]),
                          numpy_helper.to_array(_model().graph.initializer[0]))
    assert smoothing.apply(model).SerializeToString() == smoothed.SerializeToString()


def test_saved_smoothing_is_checked_against_its_digest(tmp_path: Path) -> None:
    smoothing = Smoothing({"ln": np.linspace(0.5, 2, 64), "g": np.full(48, 3.0)})
    smoothing.save(tmp_path / "s.npz")
    loaded = Smoothing.load(tmp_path / "s.npz", smoothing.digest())
    assert loaded.digest() == smoothing.digest()
    other = Smoothing({"ln": np.linspace(0.5, 2.5, 64), "g": np.full(48, 3.0)})
    with pytest.raises(SfcError, match="does not match its recipe"):
        Smoothing.load(tmp_path / "s.npz", other.digest())
    with pytest.raises(SfcError, match="smoothing not found"):
        Smoothing.load(tmp_path / "none.npz", smoothing.digest())
    with pytest.raises(SfcError, match="cannot smooth"):
        Smoothing({"h": np.ones(48)}).apply(_model())
    with pytest.raises(SfcError, match="has"):
        Smoothing({"ln": np.ones(63)}).apply(_model())


def test_config_checks_its_values() -> None:
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(SfcError, match="--smooth-alpha"):
            SmoothConfig(alpha=bad)
    with pytest.raises(SfcError, match="--smooth-clips"):
        SmoothConfig(clips=0)
    with pytest.raises(SfcError, match="apply to quantized activations"):
        BuildConfig(activations=None, smooth=SmoothConfig(alpha=0.7))


def _source(tmp_path: Path) -> tuple[Path, Path]:
    return model_with_feeds(tmp_path, _model(), (16, 64))


def test_a_build_smooths_records_and_replays(tmp_path: Path) -> None:
    src, feeds = _source(tmp_path)
    config = BuildConfig(calib=feeds, calibrator="max", act_guard=None)
    report = compile_model(str(src), tmp_path / "a", config, eval_data=None)
    folder = tmp_path / "a/model"
    recipe = json.loads((folder / "recipe.json").read_text())["_data"]
    smoothing = recipe["config"]["calibration"]["smoothing"]
    assert smoothing["alpha"] == 0.5 and smoothing["clips"] == 32
    saved = Smoothing.load(folder / "smoothing.npz", smoothing["data"])
    assert set(saved.scales) == {"ln", "g"}
    # The build quantized the smoothed model: its FP32 copy holds the folded gamma.
    fp32 = {t.name: numpy_helper.to_array(t)
            for t in onnx.load(str(folder / "model.fp32.onnx")).graph.initializer}
    assert np.allclose(fp32["gamma"], numpy_helper.to_array(_model().graph.initializer[0])
                       / saved.scales["ln"], rtol=1e-6)
    assert not (tmp_path / "a/_smoothed").exists()
    assert "2 activations (2 smoothed)" in (tmp_path / "a/report.md").read_text()
    # Replay applies the saved smoothing to the source: the same QDQ bytes, no data read.
    replay = replace(config, calib=tmp_path / "nowhere", recipe=tmp_path / "a")
    compile_model(str(src), tmp_path / "b", replay, eval_data=None)
    for file in ("model.qdq.onnx", "recipe.json", "smoothing.npz"):
        assert (folder / file).read_bytes() == (tmp_path / "b/model" / file).read_bytes()
    # A replay whose smoothing file was altered fails on its digest.
    Smoothing({k: v * 1.01 for k, v in saved.scales.items()}).save(folder / "smoothing.npz")
    with pytest.raises(SfcError, match="does not match its recipe"):
        compile_model(str(src), tmp_path / "c", replay, eval_data=None)
    # Without smoothing, nothing is recorded and the outlier costs accuracy.
    plain = compile_model(str(src), tmp_path / "d", replace(config, smooth=None),
                          eval_data=None)
    assert not (tmp_path / "d/model/smoothing.npz").exists()
    recipe = json.loads((tmp_path / "d/model/recipe.json").read_text())["_data"]
    assert recipe["config"]["calibration"]["smoothing"] is None
    assert report.distortion is not None and plain.distortion is not None
    assert report.distortion.rel_l2["y"] < plain.distortion.rel_l2["y"]


def test_a_replay_defaults_to_its_own_source_and_names_another_model(tmp_path: Path) -> None:
    """`sfc build --recipe FOLDER` without SRC replays the folder's own model (not the zoo
    default); a smoothed recipe given another model says so in one line, before its
    smoothing is read as this model's."""
    src, feeds = _source(tmp_path)
    compile_model(str(src), tmp_path / "a", BuildConfig(calib=feeds, calibrator="max",
                                                        act_guard=None), eval_data=None)
    assert replay_source(tmp_path / "a") == str(src)
    assert replay_source(tmp_path / "a/model/recipe.json") is None
    common = ["--calibrator", "max", "--no-act-guard", "--calib", str(tmp_path / "nowhere"),
              "--no-eval"]
    done = subprocess.run([sys.executable, "-m", "sfc.cli", "build", "--recipe",
                           str(tmp_path / "a"), "-o", str(tmp_path / "b"), *common],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert ((tmp_path / "a/model/model.qdq.onnx").read_bytes()
            == (tmp_path / "b/model/model.qdq.onnx").read_bytes())
    other = tmp_path / "other.onnx"
    onnx.save(_model(extra_reader=True), str(other))  # its LayerNorm output is no site
    done = subprocess.run([sys.executable, "-m", "sfc.cli", "build", str(other), "--recipe",
                           str(tmp_path / "a"), "-o", str(tmp_path / "c"), *common],
                          capture_output=True, text=True, check=False)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "was made for another model" in lines[0] and "cannot smooth" in lines[0]
    assert not (tmp_path / "c").exists()


def test_learned_weights_are_not_smoothed() -> None:
    """One-stage and fine-tuning train the PyTorch checkpoint, whose weights know nothing of
    the fold: such builds do not smooth, and record none."""
    from sfc.precision.budget import Budget
    from sfc.precision.onestage import OneStageConfig
    from sfc.precision.search import SearchConfig

    search = SearchConfig(Budget(avg_bits=5.0), method="one-stage",
                          one_stage=OneStageConfig(steps=2, finetune_steps=1))
    learned = BuildConfig(weights="mixed", search=search)
    assert learned.learns and not learned.smooths
    assert learned.recipe_config()["calibration"]["smoothing"] is None
    with pytest.raises(SfcError, match="do not apply to learned weights"):
        BuildConfig(weights="mixed", search=search, smooth=SmoothConfig(alpha=0.8))
    two_stage = BuildConfig(weights="mixed", search=SearchConfig(Budget(avg_bits=5.0)))
    assert two_stage.smooths
    assert two_stage.recipe_config()["calibration"]["smoothing"] == {"alpha": 0.5, "clips": 32}


def test_unnamed_nodes_fold_and_float16_weights_are_left_alone() -> None:
    model = _model()
    for node in model.graph.node:
        node.name = ""  # names are optional in ONNX: the fold finds producers by output
    assert set(smooth_sites(model, ["ln", "g"])) == {"ln", "g"}
    smoothed = Smoothing({"ln": np.linspace(0.5, 3.0, 64), "g": np.full(48, 4.0)}).apply(model)
    x = np.random.default_rng(3).standard_normal((8, 64)).astype(np.float32)
    for a, b in zip(_run(model, x, ["y", "y2"]), _run(smoothed, x, ["y", "y2"]), strict=True):
        assert np.allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(a).max())
    half = _model()
    w3 = next(t for t in half.graph.initializer if t.name == "w3")
    w3.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w3).astype(np.float16), "w3"))
    assert set(smooth_sites(half, ["ln", "g"])) == {"ln"}


def test_a_scalar_initializer_becomes_one_value_per_channel() -> None:
    """The Mul's scalar as an initializer instead of a `Constant` node: the fold turns it
    into 48 values (1/s), which the copy takes in place of the scalar."""
    model = _model()
    const = next(n for n in model.graph.node if n.op_type == "Constant")
    model.graph.initializer.append(numpy_helper.from_array(
        numpy_helper.to_array(const.attribute[0].t), "half"))
    model.graph.node.remove(const)
    assert set(smooth_sites(model, ["ln", "g"])) == {"ln", "g"}
    smoothing = Smoothing({"ln": np.linspace(0.5, 3.0, 64), "g": np.linspace(1.0, 4.0, 48)})
    smoothed = smoothing.apply(model)
    half = {t.name: numpy_helper.to_array(t) for t in smoothed.graph.initializer}["half"]
    assert half.shape == (48,) and np.allclose(half, 0.5 / smoothing.scales["g"])
    x = np.random.default_rng(4).standard_normal((8, 64)).astype(np.float32)
    for a, b in zip(_run(model, x, ["y", "y2"]), _run(smoothed, x, ["y", "y2"]), strict=True):
        assert np.allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(a).max())


@pytest.mark.parametrize("report", ['{"_data": null}', '{"_data": []}', '{"_data": "x"}',
                                    '[1]', '{"_data": {"src": 3}}', "not json"])
def test_replay_source_of_a_malformed_report_is_none(tmp_path: Path, report: str) -> None:
    (tmp_path / "report.json").write_text(report)
    assert replay_source(tmp_path) is None
