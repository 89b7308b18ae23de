"""ESC: scales as graph inputs, the CMA-ES search, and `sfc build --calibrator esc`."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sfc.build import ESC_INTERRUPTED, GUARD_RESULT, BuildConfig, target_caps
from sfc.calib import EscCalib, TensorStats, compute_scale, method_from_dict, method_from_name
from sfc.calib.esc import EscResult, esc_search, start_scales
from sfc.calib.objectives import (
    DistortionObjective,
    GraphSetup,
    ScaledSession,
    score,
    teacher_forcing,
)
from sfc.errors import Interrupted, SfcError
from sfc.pipeline import compile_model
from sfc.precision.activations import GuardConfig, gate_activations, gate_name
from sfc.quant import (
    PlanConfig,
    make_plan,
    model_sha256,
    recipe_from_plan,
    scale_input_name,
    write_qdq,
)
from sfc.quant.recipe import Recipe


def _outlier_model(*, branch: bool = False) -> onnx.ModelProto:
    """x[n, 16] -> fc1 -> h[n, 32] -> fc2 -> y[n, 8].

    Two channels of h are ~50x larger than the rest but barely reach y: MSE on h keeps
    them (they hold much of h's energy) at the cost of resolution for the channels y
    depends on, so the task error can drop far below MSE's. `branch`: h also feeds a third
    MatMul (two quantized readers of one activation).
    """
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 32)).astype(np.float32) * 0.3
    w1[:, :2] *= 50.0
    w2 = rng.standard_normal((32, 8)).astype(np.float32) * 0.3
    w2[:2, :] *= 0.001
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])]
    if branch:
        w3 = rng.standard_normal((32, 4)).astype(np.float32) * 0.3
        inits.append(numpy_helper.from_array(w3, "w3"))
        nodes.append(helper.make_node("MatMul", ["h", "w3"], ["z"], name="fc3"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 4]))
    graph = helper.make_graph(
        nodes, "outlier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _outlier_file(path: Path) -> Path:
    onnx.save(_outlier_model(), str(path))
    return path


def _feeds(folder: Path, n: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        np.savez(folder / f"{i:02d}.npz", x=rng.standard_normal((32, 16)).astype(np.float32))
    return folder


def _recipe(model: onnx.ModelProto, x: np.ndarray):  # type: ignore[no-untyped-def]
    plan = make_plan(model, PlanConfig(), target_caps("ort-cpu"))  # this CPU's class
    scales = {"x": (float(np.abs(x).max()) / 127, "max", {}), "h": (0.37, "max", {})}
    return recipe_from_plan(plan, scales, model_sha256(model), 0, {})


def _basic_session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------- scales as inputs


def test_scale_inputs_give_the_same_outputs_as_initializers() -> None:
    model = _outlier_model(branch=True)
    x = np.random.default_rng(2).standard_normal((32, 16)).astype(np.float32)
    recipe = _recipe(model, x)
    fixed = write_qdq(model, recipe)
    scaled = write_qdq(model, recipe, scales_as_inputs=["h"])
    onnx.checker.check_model(scaled, full_check=True)
    # One scalar input for h, shared by both of its Q/DQ pairs; no scale initializers left.
    extra = [i for i in scaled.graph.input if i.name not in {"x"}]
    assert [i.name for i in extra] == [scale_input_name("h")]
    assert not [t for t in scaled.graph.initializer if t.name.startswith("h_scale")]
    readers = [n for n in scaled.graph.node if scale_input_name("h") in n.input]
    assert len(readers) == 4  # 2 consumers x (Q, DQ)
    want = _basic_session(fixed).run(None, {"x": x})
    scale = {scale_input_name("h"): np.array(0.37, np.float32)}
    got = _basic_session(scaled).run(None, {"x": x, **scale})
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a, b)
    # The ESC session (default ORT optimisation) agrees with the fake-quantized model too.
    setup = GraphSetup(model, recipe, ("x", "h"))
    session = ScaledSession("model", setup)
    got = session.run(None, {"x": x}, {"model:x": recipe.get("x").scale,  # type: ignore[union-attr]
                                       "model:h": 0.37})
    for a, b in zip(want, got, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # Another scale changes the result: the input is really read.
    other = session.run(None, {"x": x}, {"model:x": 0.05, "model:h": 0.05})
    assert not np.allclose(other[0], want[0])
    with pytest.raises(SfcError, match="w1"):
        write_qdq(model, recipe, scales_as_inputs=["w1"])


def test_esc_sessions_take_the_targets_session_config() -> None:
    """ESC, the guard and the probes see the artifact's numerics: the target's session config
    (MatMulNBits' accuracy level on AVX2) reaches their sessions."""
    model = _outlier_model(branch=True)
    x = np.random.default_rng(2).standard_normal((32, 16)).astype(np.float32)
    recipe = _recipe(model, x)
    key = "session.qdq_matmulnbits_accuracy_level"
    for config in ((), ((key, "0"),)):
        session = ScaledSession("model", GraphSetup(model, recipe, (), session_config=config))
        options = session.session.get_session_options()
        if config:
            assert options.get_session_config_entry(key) == "0"
        else:  # ORT's default (4): no entry
            with pytest.raises(RuntimeError, match="does not have configuration"):
                options.get_session_config_entry(key)


# ---------------------------------------------------------------- the search


def _quadratic(target: Mapping[str, float]):  # type: ignore[no-untyped-def]
    def objective(scales: Mapping[str, float]) -> float:
        return sum((math.log(scales[k]) - math.log(v)) ** 2 for k, v in target.items())

    return objective


START = {"g:a": 1.0, "g:b": 1.0, "g:c": 1.0}


def test_search_budget_trace_and_seed() -> None:
    objective = _quadratic({"g:a": 2.0, "g:b": 0.5, "g:c": 1.5})
    config = EscCalib(budget=23, popsize=5, sigma0=0.3)
    r = esc_search(START, objective, config, seed=3, progress=False)
    assert r.evaluations == 20 and r.generations == 4  # whole generations within budget
    assert len(r.trace) == len(r.values) == r.evaluations
    assert all(b <= a for a, b in zip(r.trace, r.trace[1:], strict=False))
    assert r.trace[-1] == r.best_objective == min(r.values) < r.start_objective
    assert r.final_point == "mean" and r.final_objective == objective(r.scales)
    assert r.final_objective < r.start_objective
    assert esc_search(START, objective, config, seed=3, progress=False).scales == r.scales
    assert esc_search(START, objective, config, seed=4, progress=False).scales != r.scales
    with pytest.raises(SfcError, match="below one CMA-ES generation"):
        esc_search(START, objective, EscCalib(budget=4, popsize=5), seed=0, progress=False)


def test_search_stops_when_stalled() -> None:
    def objective(scales: Mapping[str, float]) -> float:  # nothing beats the start
        return 1.0 if scales == START else 2.0 + sum(abs(math.log(v)) for v in scales.values())

    r = esc_search(START, objective, EscCalib(budget=100, popsize=5, stall=10), 0,
                   progress=False)
    assert r.evaluations == 10 and not r.interrupted
    assert r.scales == r.start and r.final_point == "best"  # mean never beat the start


def test_ctrl_c_returns_the_best_so_far() -> None:
    inner = _quadratic({"g:a": 2.0, "g:b": 0.5, "g:c": 1.5})
    calls = []

    def objective(scales: Mapping[str, float]) -> float:
        calls.append(1)
        if len(calls) > 8:  # the start, then 7 candidates
            raise KeyboardInterrupt
        return inner(scales)

    r = esc_search(START, objective, EscCalib(budget=50, popsize=5, sigma0=0.3), 0,
                   progress=False)
    assert r.interrupted and r.final_point == "interrupted" and r.evaluations == 7
    assert r.scales == r.best and r.final_objective == r.best_objective == min(r.values)
    assert inner(r.scales) == r.best_objective
    assert EscResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_start_scales_tune_only_the_scope() -> None:
    acc = TensorStats("t")
    acc.update(np.random.default_rng(0).standard_normal(5000))
    snap = acc.snapshot()
    stats = {"a": snap, "b": snap}
    out = start_scales(stats, {"a": ("MatMul", "Add"), "b": ("Gemm",)},
                       EscCalib(scope=("MatMul",)))
    assert out["a"][1] and out["a"][0].method == "mse"
    assert not out["b"][1] and out["b"][0].method == "max"
    assert out["a"][0].scale < out["b"][0].scale


def test_config_validation_and_registry() -> None:
    assert method_from_name("esc", budget=10) == EscCalib(budget=10)
    config = EscCalib(budget=10, popsize=6, scope=("MatMul",))
    assert method_from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for bad in ({"budget": 0}, {"sigma0": 0.0}, {"popsize": 2}, {"objective": "wer"},
                {"scope": "MatMul"}, {"samples": -1}):
        with pytest.raises(SfcError):
            EscCalib(**bad)  # type: ignore[arg-type]
    acc = TensorStats("t")
    acc.update(np.ones(4))
    with pytest.raises(SfcError, match="jointly"):
        compute_scale(acc.snapshot(), EscCalib())
    with pytest.raises(SfcError, match="calibrator esc"):
        BuildConfig(calibrator="mse", esc_budget=5)
    BuildConfig(calibrator="esc", esc_budget=5, esc_objective="kl")  # valid until the card


# ---------------------------------------------------------------- Whisper objectives


def test_teacher_forcing_scores_transcript_and_eot_only() -> None:
    prompt, eot = [50257, 50362], 50256
    tokens, mask = teacher_forcing([[*prompt, 11, 12, eot], [*prompt, eot]], len(prompt), eot)
    assert tokens.tolist() == [[*prompt, 11, 12, eot], [*prompt, eot, eot, eot]]
    # Position t predicts tokens[t + 1]: 11, 12, eot for row 0; eot alone for row 1.
    assert mask.tolist() == [[False, True, True, True], [False, True, False, False]]
    assert tokens[:, 1:][mask].tolist() == [11, 12, eot, eot]


def test_scores() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 7)).astype(np.float32)
    targets = np.array([0, 3, 6, 2, 2])
    total, n = score("teacher-forced", logits, targets, None)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert n == 5 and total == pytest.approx(-logp[np.arange(5), targets].sum(), rel=1e-5)
    ref = logp.astype(np.float32)
    assert score("kl", logits, targets, ref)[0] == pytest.approx(0.0, abs=1e-5)
    assert score("kl", logits[::-1].copy(), targets, ref)[0] > 0.1
    assert score("distortion", logits, targets, logits) == (0.0, 1)


@pytest.mark.slow
def test_whisper_esc_build(tmp_path: Path) -> None:
    """One CMA-ES generation on whisper-tiny.en, encoder and decoder jointly (minutes)."""
    config = BuildConfig(calibrator="esc", calib_limit=4, esc_samples=2, esc_budget=14,
                         esc_popsize=14)
    report = compile_model("whisper-tiny.en", tmp_path / "esc", config, eval_data=None)
    esc = report.esc
    assert esc is not None and esc.objective == "teacher-forced" and esc.evaluations == 14
    assert {s.graph for s in esc.scales} == {"encoder", "decoder"}
    assert 0 < esc.final_objective <= esc.start_objective < 2.0
    for graph in ("encoder", "decoder"):
        assert set(_activation_methods(tmp_path / "esc" / graph / "recipe.json").values()) \
            == {"esc"}


# ---------------------------------------------------------------- the build


def _activation_methods(recipe_path: Path) -> dict[str, str]:
    data = json.loads(recipe_path.read_text())["_data"]
    return {t["tensor"]: t["method"] for t in data["tensors"] if t["kind"] == "activation"}


def test_esc_build_beats_mse_reproducibly(tmp_path: Path) -> None:
    src, feeds = _outlier_file(tmp_path / "m.onnx"), _feeds(tmp_path / "feeds")
    config = BuildConfig(calibrator="esc", calib=feeds, esc_budget=60, seed=0)
    report = compile_model(str(src), tmp_path / "a", config, eval_data=None)
    esc = report.esc
    assert esc is not None and esc.objective == "distortion"
    assert esc.final_objective < 0.5 * esc.start_objective  # the outliers are worth clipping
    assert esc.evaluations <= 60
    # The objective is what the built artifact (integer kernels) measures, near enough.
    assert report.distortion is not None
    assert report.distortion.rel_l2["y"] == pytest.approx(esc.final_objective, rel=0.05)
    recipe = tmp_path / "a/model/recipe.json"
    assert _activation_methods(recipe) == {"x": "esc", "h": "esc"}
    tensors = json.loads(recipe.read_text())["_data"]["tensors"]
    h = next(t for t in tensors if t["tensor"] == "h")
    assert h["scale"] < h["stats"]["mse_scale"]  # ESC clipped the outlier channels
    result = EscResult.load(tmp_path / "a/esc.json")
    assert result.scales["model:h"] == h["scale"] and result.seed == 0
    assert (tmp_path / "a/plots/esc_trace.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "a/report.md").read_text()
    assert "## ESC" in md and "plots/esc_trace.png" in md and "| model | `h` |" in md
    # Same inputs and seed: the same recipe, byte for byte; another seed searches elsewhere.
    compile_model(str(src), tmp_path / "b", config, eval_data=None)
    assert (tmp_path / "b/model/recipe.json").read_bytes() == recipe.read_bytes()
    other = BuildConfig(calibrator="esc", calib=feeds, esc_budget=60, seed=1)
    compile_model(str(src), tmp_path / "c", other, eval_data=None)
    assert EscResult.load(tmp_path / "c/esc.json").scales != result.scales
    # The recipe replays without calibration data.
    replay = BuildConfig(calibrator="esc", calib=tmp_path / "nowhere", recipe=tmp_path / "a")
    compile_model(str(src), tmp_path / "d", replay, eval_data=None)
    assert (tmp_path / "d/model/model.qdq.onnx").read_bytes() == \
        (tmp_path / "a/model/model.qdq.onnx").read_bytes()


def test_teacher_forced_objective_needs_whisper(tmp_path: Path) -> None:
    src, feeds = _outlier_file(tmp_path / "m.onnx"), _feeds(tmp_path / "feeds")
    config = BuildConfig(calibrator="esc", calib=feeds, esc_objective="teacher-forced")
    with pytest.raises(SfcError, match="needs a Whisper model"):
        compile_model(str(src), tmp_path / "out", config, eval_data=None)


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, calls: int) -> None:
    real = DistortionObjective.__call__
    count = [0]

    def flaky(self: DistortionObjective, scales: Mapping[str, float]) -> float:
        count[0] += 1
        if count[0] > calls:
            raise KeyboardInterrupt
        return real(self, scales)

    monkeypatch.setattr(DistortionObjective, "__call__", flaky)


def test_ctrl_c_during_build_saves_best_so_far_recipe(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    src, feeds = _outlier_file(tmp_path / "m.onnx"), _feeds(tmp_path / "feeds")
    _interrupt_after(monkeypatch, 12)
    out = tmp_path / "out"
    with pytest.raises(Interrupted, match="best-so-far") as caught:
        compile_model(str(src), out, BuildConfig(calibrator="esc", calib=feeds), eval_data=None)
    assert isinstance(caught.value, KeyboardInterrupt)
    saved = out / ESC_INTERRUPTED
    assert _activation_methods(saved / "model/recipe.json") == {"x": "esc", "h": "esc"}
    result = EscResult.load(saved / "esc.json")
    assert result.interrupted and result.evaluations == 11
    assert not list(out.rglob("*.onnx"))  # the build itself stopped
    monkeypatch.undo()
    compile_model(str(src), tmp_path / "done", BuildConfig(recipe=saved), eval_data=None)
    assert (tmp_path / "done/model/model.qdq.onnx").is_file()


def test_cli_exits_130_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from sfc.cli import main

    src, feeds = _outlier_file(tmp_path / "m.onnx"), _feeds(tmp_path / "feeds")
    _interrupt_after(monkeypatch, 5)
    monkeypatch.setattr(sys, "argv", ["sfc", "build", str(src), "-o", str(tmp_path / "out"),
                                      "--calibrator", "esc", "--calib", str(feeds),
                                      "--esc-budget", "30", "--no-eval"])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 130
    lines = [ln for ln in capsys.readouterr().err.splitlines()
             if ln.strip() and "━" not in ln]
    assert len(lines) == 1 and "interrupted" in lines[0] and ESC_INTERRUPTED in lines[0]


@pytest.mark.slow
def test_whisper_activation_guard_keeps_float_what_it_reports(tmp_path: Path) -> None:
    """The guard after max calibration on whisper-tiny.en (its fc2 outliers cost KL)."""
    config = BuildConfig(calibrator="max", calib_limit=4,
                         act_guard=GuardConfig(allowance=0.0, max_float=2, samples=2))
    report = compile_model("whisper-tiny.en", tmp_path / "g", config, eval_data=None)
    guard = json.loads((tmp_path / "g" / GUARD_RESULT).read_text())
    assert report.guard == guard and guard["quantized"] > guard["float"] >= 0
    kept = [(k["graph"], k["tensor"]) for k in guard["kept"]]
    assert 1 <= len(kept) <= 2 and not guard["met"]  # allowance 0 cannot be met
    assert guard["kept"][-1]["kl_after"] == guard["final"]
    for graph, tensor in kept:
        assert tensor not in _activation_methods(tmp_path / "g" / graph / "recipe.json")
    assert "## Activation guard" in (tmp_path / "g" / "report.md").read_text()
    # The kept-float entries are in the recipe: a replay writes the same graphs.
    compile_model("whisper-tiny.en", tmp_path / "r", BuildConfig(recipe=tmp_path / "g"),
                  eval_data=None)
    for graph in ("encoder", "decoder"):
        assert (tmp_path / "r" / graph / "model.qdq.onnx").read_bytes() == \
            (tmp_path / "g" / graph / "model.qdq.onnx").read_bytes()
    # Its encoder probes ran segmented (`calib.segments`): bit for bit the whole graph's.
    folder = tmp_path / "g" / "encoder"
    recipe = Recipe.load(folder / "recipe.json")
    quantized = {n.input[0] for n in onnx.load(str(folder / "model.qdq.onnx")).graph.node
                 if n.op_type == "QuantizeLinear"}
    acts = tuple(t.tensor for t in recipe.tensors
                 if t.kind == "activation" and t.tensor in quantized)
    setup = GraphSetup(onnx.load(str(folder / "model.fp32.onnx")), recipe, (),
                       tuple(gate_name(t) for t in acts),
                       rewrite=lambda m: gate_activations(m, acts))
    whole, parts = ScaledSession("e", setup), ScaledSession("e", setup, segmented=True)
    assert parts.segments is not None and len(parts.segments.segments) > 4
    window = np.random.default_rng(0).standard_normal((1, 80, 3000)).astype(np.float32)
    late = gate_name(acts[-2])  # read after most cuts: its probe starts late
    for off in (None, late, gate_name(acts[1]), None):
        scales = {f"e:{gate_name(t)}": float(gate_name(t) != off) for t in acts}
        for a, b in zip(whole.run(None, {"input_features": window}, scales),
                        parts.run(None, {"input_features": window}, scales), strict=True):
            np.testing.assert_array_equal(a, b)
