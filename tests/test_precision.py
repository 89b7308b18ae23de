"""Per-layer precision and two-stage mixed precision: maps, budgets, the integer program,
probes, and mixed / GPTQ builds end to end on a small graph."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from test_quant_graphs import speech_model

from sfc.build import BuildConfig
from sfc.calib.objectives import GraphSetup, ScaledSession, switch_feed
from sfc.errors import SfcError
from sfc.pipeline import compile_model
from sfc.precision.activations import (
    GuardConfig,
    gate_activations,
    gate_name,
    guard_activations,
    guard_clips,
    probe_activations,
)
from sfc.precision.budget import Budget, WeightOption, parse_format, storage_bits
from sfc.precision.mapfile import load_precision
from sfc.precision.probe import ProbeGraph, run_probes, switchable
from sfc.precision.search import SearchConfig, candidate_specs
from sfc.precision.solve import fill_budget, solve_choice
from sfc.quant.gptq import GptqConfig
from sfc.quant.plan import (
    LayerPrecision,
    PlanConfig,
    entries_for_graph,
    entry_graph,
    exact_pattern,
    make_plan,
)
from sfc.quant.qdq import write_qdq
from sfc.quant.recipe import Recipe, model_sha256
from sfc.quant.spec import ORT_CPU_CAPS, SIM_CAPS, QuantSpec
from sfc.quant.tied_table import MAX_HELDOUT_RATIO
from sfc.quant.weights import Rounded, dequantize_weight, quantize_weight, weight_scales
from tests.test_build import _feeds, _mlp


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mixed builds cache their probes under $SFC_CACHE: never the user's."""
    monkeypatch.setenv("SFC_CACHE", str(tmp_path / "cache"))


# ------------------------------------------------------------------ budget and program


def test_storage_bits_count_scales() -> None:
    assert storage_bits((64, 32), QuantSpec(4, "block", 0, 32)) == 64 * 32 * 4 + 2 * 32 * 32
    assert storage_bits((64, 32), QuantSpec(8, "channel", 1)) == 64 * 32 * 8 + 32 * 32
    assert storage_bits((64, 32), None) == 64 * 32 * 32
    assert parse_format("4/128") == (4, 128) and parse_format("8") == (8, None)
    for bad in ("3", "4", "8/32", "4/24", "x"):
        with pytest.raises(SfcError, match="bad weight format"):
            parse_format(bad)


def _brute(options: dict[str, list[WeightOption]], allowed: float) -> float:
    best = math.inf
    for pick in itertools.product(*options.values()):
        if sum(o.bits for o in pick) <= allowed:
            best = min(best, sum(o.sensitivity for o in pick))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_program_meets_budget_and_is_optimal(seed: int) -> None:
    rng = np.random.default_rng(seed)
    options = {}
    for i in range(int(rng.integers(2, 6))):
        n = int(rng.integers(1, 4))
        bits = sorted(rng.integers(10, 200, size=n).tolist())
        # Fewer bits usually cost more, with noise (negative sensitivities included).
        sens = [float(rng.normal(200 - b, 30)) for b in bits]
        options[f"w{i}"] = [WeightOption(None, b, s) for b, s in zip(bits, sens, strict=True)]
    floor = sum(min(o.bits for o in v) for v in options.values())
    top = sum(max(o.bits for o in v) for v in options.values())
    allowed = float(rng.integers(floor, top + 1))
    chosen = solve_choice(options, allowed)
    used = sum(options[w][k].bits for w, k in chosen.items())
    assert used <= allowed
    total = sum(options[w][k].sensitivity for w, k in chosen.items())
    assert total == pytest.approx(_brute(options, allowed), abs=1e-6)


def test_fill_budget_spends_what_the_program_left_on_the_cheapest_upgrades() -> None:
    # -log p costs: the program takes the most probable choice within 250 bits (a at 100,
    # b at 50: 150 bits), leaving 100 unspent.
    options = {"a": [WeightOption(None, 100, 0.1), WeightOption(None, 200, 3.0)],
               "b": [WeightOption(None, 50, 0.2), WeightOption(None, 100, 2.0),
                     WeightOption(None, 150, 2.5)]}
    chosen = solve_choice(options, 250)
    assert chosen == {"a": 0, "b": 0}
    filled = fill_budget(options, chosen, 250)
    # b to 150 bits costs 2.3 for 100 bits (0.023 per bit): cheaper per bit than a's
    # upgrade (2.9 for 100) and than b's first step (1.8 for 50: 0.036 per bit).
    assert filled == {"a": 0, "b": 2}
    assert sum(options[n][i].bits for n, i in filled.items()) == 250
    # Nothing fits: unchanged. The input is not modified.
    assert fill_budget(options, chosen, 160) == chosen == {"a": 0, "b": 0}


def test_program_refuses_an_impossible_budget() -> None:
    options = {"a": [WeightOption(None, 100, 0.0)], "b": [WeightOption(None, 50, 1.0)]}
    with pytest.raises(SfcError, match="below the smallest choice"):
        solve_choice(options, 149)
    with pytest.raises(SfcError, match="no quantizable weight"):
        solve_choice({}, 10)


def test_budget_validation() -> None:
    for kwargs, why in (({"avg_bits": 1.9}, "between"), ({"avg_bits": 8.5}, "between"),
                        ({"avg_bits": float("nan")}, "between"), ({}, "exactly one"),
                        ({"avg_bits": 4, "size_mb": 3}, "exactly one"),
                        ({"size_mb": -1}, "positive")):
        with pytest.raises(SfcError, match=why):
            Budget(**kwargs)
    assert Budget(avg_bits=4).bits_allowed(1000, 0) == 4000
    assert Budget(size_mb=1).bits_allowed(0, 250_000) == 750_000 * 8


# ------------------------------------------------------------------ per-layer maps


def test_precision_map_is_applied_exactly(tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"q_proj": 2, "k_proj": {"weights": 4, "block_size": 16},
                                "fc*": "float", "v_proj": {"activations": "float"},
                                "*": {"block_size": 32}}))
    entries = load_precision(path)
    config = PlanConfig(weight_bits=4, precision=entries)
    plan = make_plan(speech_model(), config, SIM_CAPS)
    specs = {q.tensor: q.spec for q in plan.weights}
    # (sim runs a zero point per block)
    assert specs["q.w"] == QuantSpec(2, "block", 0, 32, zero_point=True)
    assert specs["k.w"] == QuantSpec(4, "block", 0, 16, zero_point=True)
    assert specs["v.w"] == QuantSpec(4, "block", 0, 32, zero_point=True)  # the uniform setting
    skipped = {s.node: s.reason for s in plan.skipped}
    assert "precision entry 'fc*'" in skipped["fc1"] and "fc*" in skipped["fc2"]
    assert plan.get("fc1.w") is None and plan.get("fc2.w") is None
    # v's input is shared with q and k: quantized for them, not for v.
    ln = plan.get("ln")
    assert ln is not None and set(ln.consumers) == {"q_proj", "k_proj"}


def test_precision_map_errors(tmp_path: Path) -> None:
    for text, why in (("[1]", "non-empty JSON object"), ("{", "not valid JSON"),
                      ('{"q": 3}', "must be 8, 4 or 2"), ('{"q": true}', "must be 8, 4, 2"),
                      ('{"q": {"bits": 4}}', "malformed precision entry")):
        path = tmp_path / "m.json"
        path.write_text(text)
        with pytest.raises(SfcError, match=why):
            load_precision(path)
    with pytest.raises(SfcError, match="not found"):
        load_precision(tmp_path / "missing.json")
    # 2-bit weights on a target that has none are refused before any calibration.
    caps = ORT_CPU_CAPS.__class__(**{**ORT_CPU_CAPS.__dict__,
                                     "weight_bits": frozenset({8, 4})})
    config = PlanConfig(precision=(LayerPrecision("q_proj", weights=2),))
    with pytest.raises(SfcError, match="does not run 2-bit weights"):
        make_plan(speech_model(), config, caps)


def test_graph_qualified_entries_apply_to_their_graph_only() -> None:
    entries = (LayerPrecision("decoder:/k_proj/MatMul", weights=8),
               LayerPrecision("encoder:/k_proj/MatMul", weights=2),
               LayerPrecision("/encoder/conv1/Conv", weights="float"),
               LayerPrecision("*fc2*", weights=8))
    assert [entry_graph(e) for e in entries] == ["decoder", "encoder", None, None]
    dec = entries_for_graph(entries, "decoder")
    assert [(e.pattern, e.weights) for e in dec] == [
        ("/k_proj/MatMul", 8), ("/encoder/conv1/Conv", "float"), ("*fc2*", 8)]
    assert [e.weights for e in entries_for_graph(entries, "encoder")][:1] == [2]
    assert len(entries_for_graph(entries, "model")) == 2  # the unqualified ones
    # The graph's plan config carries only its own entries, so its recipe does too.
    config = BuildConfig(weights=4, precision=entries)
    assert config.plan_config("decoder").precision == dec
    assert config.plan_config().precision == entries


def test_graph_qualified_map_in_a_build(tmp_path: Path) -> None:
    src, feeds = _mlp(tmp_path / "mlp.onnx"), _feeds(tmp_path / "feeds")
    config = _config(feeds, weights=4, precision=(LayerPrecision("model:fc1", weights=8),))
    compile_model(str(src), tmp_path / "a", config, eval_data=None)
    recipe = Recipe.load(tmp_path / "a" / "model" / "recipe.json")
    assert {t.tensor: t.spec.bits for t in recipe.tensors if t.kind == "weight"} == \
        {"w1": 8, "w2": 4}
    # A graph the model does not have: one line, before calibration (no data here).
    bad = _config(tmp_path / "missing", weights=4,
                  precision=(LayerPrecision("decoder:fc1", weights=8),))
    with pytest.raises(SfcError, match=r"'decoder:fc1': this model has no graph 'decoder' "
                                       r"\(its graphs: model\)"):
        compile_model(str(src), tmp_path / "b", bad, eval_data=None)
    assert not (tmp_path / "b").exists()


def test_exact_pattern_matches_only_its_name() -> None:
    entry = LayerPrecision(exact_pattern("/a[0]/b*?"), weights=8)
    assert entry.matches("/a[0]/b*?")
    assert not entry.matches("/a0/bx?") and not entry.matches("/a[0]/b*?x")


def test_candidate_specs_follow_the_target_rules() -> None:
    plan, specs = candidate_specs(speech_model(), PlanConfig(), ORT_CPU_CAPS,
                                  ("8", "4/32", "2/32"))
    # Conv and Gemm have no block kernel on ORT CPU: INT8 is their only option.
    assert [s.bits for s in specs["conv.w"]] == [8]
    assert [s.bits for s in specs["q.w"]] == [8, 4, 2]
    assert all(q.tensor in specs for q in plan.weights)


# ------------------------------------------------------------------ probes


def test_switchable_model_switches_exactly_one_weight(tmp_path: Path) -> None:
    model = onnx.load(str(_mlp(tmp_path / "m.onnx")))
    w1 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w1"))
    spec = QuantSpec(2, "block", 0, 32)
    scales = weight_scales(w1, spec, "mse")
    rounded = Rounded(quantize_weight(w1, spec, scales), spec, scales)
    deq = dequantize_weight(rounded.ints, spec, scales)
    probe = switchable(model, {"w1": [rounded]})
    assert probe.gates == ("w1__probe0",)
    # The probe holds the format's int8 integers, dequantized only when fed.
    assert probe.switches["w1__probe0"][0][1].ints.dtype == np.int8
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    run = ort.InferenceSession(probe.model.SerializeToString(),
                               providers=["CPUExecutionProvider"])
    fp32 = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    off = run.run(None, {"x": x, **switch_feed(probe.switches, {"w1__probe0": 0.0})})[0]
    np.testing.assert_array_equal(off, fp32.run(None, {"x": x})[0])
    swapped = onnx.ModelProto()
    swapped.CopyFrom(model)
    for t in swapped.graph.initializer:
        if t.name == "w1":
            t.CopyFrom(numpy_helper.from_array(deq, "w1"))
    want = ort.InferenceSession(swapped.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    on = run.run(None, {"x": x, **switch_feed(probe.switches, {"w1__probe0": 1.0})})[0]
    np.testing.assert_array_equal(on, want)  # the probed weight to the bit
    assert np.abs(on - off).max() > 1e-2  # the switch changes something
    # The session holds the FP32 weight once: no delta constant is in the graph.
    assert [t.name for t in probe.model.graph.initializer] == \
        [t.name for t in model.graph.initializer]
    for bad in ({"w1__probe0": 0.5}, {"w1__probe0": 2.0}):
        with pytest.raises(ValueError, match="0 or 1"):
            switch_feed(probe.switches, bad)


def _two_format_probe(tmp_path: Path) -> tuple[ProbeGraph, list[Rounded]]:
    """The MLP's w1 switchable between INT8 per-channel and INT2 block 32."""
    model = onnx.load(str(_mlp(tmp_path / "m.onnx")))
    w1 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w1"))
    formats = []
    for spec in (QuantSpec(8, "channel", 1), QuantSpec(2, "block", 0, 32)):
        scales = weight_scales(w1, spec, "mse")
        formats.append(Rounded(quantize_weight(w1, spec, scales), spec, scales))
    return switchable(model, {"w1": formats}), formats


def test_two_formats_of_one_weight_are_never_fed_together(tmp_path: Path) -> None:
    probe, formats = _two_format_probe(tmp_path)
    assert probe.gates == ("w1__probe0", "w1__probe1")
    np.testing.assert_array_equal(switch_feed(probe.switches, {"w1__probe1": 1.0})["w1"],
                                  formats[1].array())
    assert not np.array_equal(formats[0].array(), formats[1].array())
    with pytest.raises(ValueError, match="two formats of w1"):
        switch_feed(probe.switches, {"w1__probe0": 1.0, "w1__probe1": 1.0})


def test_scaled_session_dequantizes_a_mix_once_and_holds_only_the_last(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A probe runs several batches on one mix: its weights are dequantized once, and a new
    mix replaces the old one (a whole mix's weights are a model's worth)."""
    probe, formats = _two_format_probe(tmp_path)
    setup = GraphSetup(probe.model, Recipe(model_sha256(probe.model), 0, {}, ()), (),
                       switches=probe.switches)
    session = ScaledSession("model", setup)
    made: list[tuple[str, ...]] = []
    real = switch_feed

    def counting(switches: Any, values: Any) -> dict[str, np.ndarray]:
        made.append(tuple(g for g, v in values.items() if v))
        return real(switches, values)

    monkeypatch.setattr("sfc.calib.objectives.switch_feed", counting)
    x = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    mix0 = {"model:w1__probe0": 1.0, "model:w1__probe1": 0.0}
    mix1 = {"model:w1__probe0": 0.0, "model:w1__probe1": 1.0}
    first = session.scale_feed(mix0)
    again = session.scale_feed(mix0)
    assert made == [("w1__probe0",)] and again["w1"] is first["w1"]  # one dequantization
    np.testing.assert_array_equal(first["w1"], formats[0].array())
    out0 = session.run(None, {"x": x}, mix0)[0]
    assert made == [("w1__probe0",)]  # running the same mix reuses it
    out1 = session.run(None, {"x": x}, mix1)[0]
    assert made == [("w1__probe0",), ("w1__probe1",)]
    np.testing.assert_array_equal(session.scale_feed(mix1)["w1"], formats[1].array())
    assert not np.array_equal(out0, out1)  # the session really took the new weights
    # Only the current mix is held: the first mix's array is no longer referenced there.
    held = list(session._switched[1].values())
    assert all(a is not first["w1"] for a in held) and len(held) == 1
    # All gates off: nothing fed, the FP32 weight of the graph runs.
    off = {"model:w1__probe0": 0.0, "model:w1__probe1": 0.0}
    assert "w1" not in session.scale_feed(off)


def test_probes_resume_from_their_checkpoint(tmp_path: Path) -> None:
    calls = []

    def objective(feed: dict[str, float]) -> float:
        calls.append(dict(feed))
        return 1.0 + sum(i * v for i, v in enumerate(feed.values()))

    gates = {"g": {"w": ["a", "b"], "u": ["c"]}}
    base, out = run_probes(objective, gates, tmp_path / "p.json", "k1", progress=False)
    assert base == 1.0 and out == {"g": {"w": [0.0, 1.0], "u": [2.0]}}
    assert len(calls) == 4
    again = run_probes(objective, gates, tmp_path / "p.json", "k1", progress=False)
    assert again == (base, out) and len(calls) == 4  # nothing re-measured
    run_probes(objective, gates, tmp_path / "p.json", "other-key", progress=False)
    assert len(calls) == 8  # another model or method: measured afresh


class _Reversed:
    """An executor that evaluates a generation back to front (as workers finishing out of
    order would) and yields the values in input order."""

    def __init__(self, objective: Any) -> None:
        self.objective, self.sent = objective, []

    def evaluate(self, candidates: Any) -> Any:
        self.sent.append(len(candidates))
        values = [self.objective(c) for c in reversed(candidates)]
        return iter(values[::-1])

    def close(self) -> None:
        pass


def test_probes_through_an_executor_match_in_process(tmp_path: Path) -> None:
    def objective(feed: dict[str, float]) -> float:
        return 1.0 + sum((i + 1) ** 2 * v for i, v in enumerate(feed.values()))

    gates = {"g": {"w": ["a", "b"], "u": ["c"]}, "h": {"v": ["d"]}}
    here = run_probes(objective, gates, progress=False)
    executor = _Reversed(objective)
    assert run_probes(objective, gates, progress=False, executor=executor) == here
    assert executor.sent == [5]
    # Resuming: only the probes missing from the checkpoint go to the executor.
    path = tmp_path / "p.json"
    run_probes(objective, {"g": {"w": ["a"]}}, path, "k", progress=False)
    executor = _Reversed(objective)
    assert run_probes(objective, gates, path, "k", progress=False, executor=executor) == here
    assert executor.sent == [3]


# ------------------------------------------------------------------ builds


def _config(feeds: Path, **kwargs: object) -> BuildConfig:
    return BuildConfig(target="sim", activations=None, calibrator="mse", calib=feeds,
                       **kwargs)  # type: ignore[arg-type]


def test_mixed_build_meets_its_budget_and_replays(tmp_path: Path) -> None:
    src, feeds = _mlp(tmp_path / "mlp.onnx"), _feeds(tmp_path / "feeds")
    search = SearchConfig(Budget(avg_bits=4.0), candidates=("8", "4/32", "2/32"), samples=3)
    config = _config(feeds, weights="mixed", search=search, weight_method="gptq")
    compile_model(str(src), tmp_path / "a", config, eval_data=None)
    result = json.loads((tmp_path / "a" / "precision.json").read_text())
    assert result["avg_bits"] <= 4.0 and result["bits_used"] <= result["bits_allowed"]
    chosen = {layer["tensor"]: layer["chosen"] for layer in result["layers"]}
    assert set(chosen) == {"w1", "w2"} and len(set(chosen.values())) > 1  # really mixed
    recipe = Recipe.load(tmp_path / "a" / "model" / "recipe.json")
    bits = {t.tensor: t.spec.bits for t in recipe.tensors if t.kind == "weight"}
    assert {k: str(v) for k, v in bits.items()} == {k: v.split("/")[0] for k, v in chosen.items()}
    assert recipe.config["weights"]["search"]["avg_bits"] == 4.0
    report = (tmp_path / "a" / "report.md").read_text()
    assert "## Mixed precision (two-stage)" in report and "| w1 |" not in report
    assert f"**{chosen['w1']}**" in report and "Spearman" in report
    assert (tmp_path / "a" / "plots" / "bits.png").stat().st_size > 1000
    assert (tmp_path / "a" / "plots" / "precision_frontier.png").stat().st_size > 1000
    # Same inputs and seed: the same bytes (the probes come from the cache the 2nd time).
    probes = list((tmp_path / "cache" / "probes").glob("*.json"))
    assert len(probes) == 1
    compile_model(str(src), tmp_path / "b", config, eval_data=None)
    for name in ("recipe.json", "model.qdq.onnx"):
        assert (tmp_path / "a" / "model" / name).read_bytes() == \
            (tmp_path / "b" / "model" / name).read_bytes()
    replay = BuildConfig(target="sim", activations=None, calibrator="mse",
                         recipe=tmp_path / "a")
    compile_model(str(src), tmp_path / "c", replay, eval_data=None)
    assert (tmp_path / "a" / "model" / "model.qdq.onnx").read_bytes() == \
        (tmp_path / "c" / "model" / "model.qdq.onnx").read_bytes()


def test_gptq_build_stores_its_weights(tmp_path: Path) -> None:
    src, feeds = _mlp(tmp_path / "mlp.onnx"), _feeds(tmp_path / "feeds")
    compile_model(str(src), tmp_path / "g", _config(feeds, weights=4, weight_method="gptq"),
                  eval_data=None)
    recipe = Recipe.load(tmp_path / "g" / "model" / "recipe.json")
    assert {t.method for t in recipe.tensors if t.kind == "weight"} == {"gptq"}
    assert recipe.weight_data is not None and (tmp_path / "g" / "model" / "weights.npz").is_file()
    (tmp_path / "g" / "model" / "weights.npz").unlink()
    with pytest.raises(SfcError, match="stored weights not found"):
        compile_model(str(src), tmp_path / "r", _config(feeds, recipe=tmp_path / "g"),
                      eval_data=None)


def test_impossible_budget_fails_before_calibration(tmp_path: Path) -> None:
    src = _mlp(tmp_path / "mlp.onnx")
    search = SearchConfig(Budget(avg_bits=2.5), candidates=("8", "4/32", "2/32"))
    # No calibration data at all: the budget error must come first.
    config = _config(tmp_path / "missing", weights="mixed", search=search)
    # INT2 in blocks of 32 with a zero point each: 2 + 32/32 + 2/32 bits.
    with pytest.raises(SfcError, match=r"--avg-bits 3.07 at least"):
        compile_model(str(src), tmp_path / "x", config, eval_data=None)
    # A budget it can meet, still no data: a mixed build cannot search without feeds.
    config = replace(config, search=SearchConfig(Budget(avg_bits=6), candidates=("8", "4/32")))
    with pytest.raises(SfcError, match=r"--weights mixed needs calibration feeds: .*--calib DIR"):
        compile_model(str(src), tmp_path / "x", config, eval_data=None)
    assert not (tmp_path / "x").exists()


def test_mixed_build_without_quantizable_weights_fails_before_calibration(
        tmp_path: Path) -> None:
    src, feeds = _mlp(tmp_path / "mlp.onnx"), _feeds(tmp_path / "feeds")
    config = _config(feeds, weights="mixed", search=SearchConfig(Budget(avg_bits=4)),
                     exclude=("fc*",))
    with pytest.raises(SfcError, match="quantizes no weight"):
        compile_model(str(src), tmp_path / "x", config, eval_data=None)


def test_verification_corrects_compounding_low_bit_choices() -> None:
    from sfc.precision.search import _verified

    four, two = QuantSpec(4, "block", 0, 32), QuantSpec(2, "block", 0, 32)
    names = ("w1", "w2", "w3")
    options = {f"g:{n}": [WeightOption(four, 50, 0.3), WeightOption(two, 30, 0.1)]
               for n in names}
    gates = {"g": {n: [f"{n}__probe0", f"{n}__probe1"] for n in names}}

    def objective(feed: dict[str, float]) -> float:
        # Each 2-bit weight alone costs what its probe said, but pairs of them compound.
        low = [n for n in names if feed[f"g:{n}__probe1"] == 1.0]
        high = [n for n in names if feed[f"g:{n}__probe0"] == 1.0]
        assert len(low) + len(high) == 3  # every weight switched to its chosen format
        return 0.1 * len(low) + 0.3 * len(high) + 1.0 * len(low) * (len(low) - 1) / 2

    picked, rounds = _verified(options, 130, objective, gates, 0.0)
    assert rounds[0]["sub4bit_weights"] == 3 and rounds[0]["measured"] > 3  # additive: all 2-bit
    assert sorted(picked.values()) == [0, 0, 1]  # corrected: one 2-bit weight
    assert sum(options[k][i].bits for k, i in picked.items()) <= 130
    assert [r["kept"] for r in rounds] == [False, True, False]
    assert rounds[2]["choice"] == "uniform 2/32"  # uniform 4/32 (150 bits) does not fit


def test_verification_keeps_a_uniform_format_that_measures_better() -> None:
    from sfc.precision.search import _verified

    b32, b128 = QuantSpec(4, "block", 0, 32), QuantSpec(4, "block", 0, 128)
    options = {"g:a": [WeightOption(b32, 50, 0.3), WeightOption(b128, 42, 0.1)],
               "g:b": [WeightOption(b32, 50, 0.3), WeightOption(b128, 42, 0.35)]}
    gates = {"g": {n: [f"{n}__probe0", f"{n}__probe1"] for n in ("a", "b")}}

    def objective(feed: dict[str, float]) -> float:
        # The probes favour a mix (a at 4/128, b at 4/32), which really costs 1.0;
        # uniform 4/32 costs 0.5 and uniform 4/128 0.7.
        if feed["g:a__probe0"] == feed["g:b__probe0"] == 1.0:
            return 0.5
        return 0.7 if feed["g:a__probe1"] == feed["g:b__probe1"] == 1.0 else 1.0

    picked, rounds = _verified(options, 100, objective, gates, 0.0)
    assert rounds[0]["choice"] == "program, round 1" and rounds[0]["measured"] == 1.0
    assert picked == {"g:a": 0, "g:b": 0}
    assert next(r for r in rounds if r["kept"])["choice"] == "uniform 4/32"


# ------------------------------------------------------------------ activation probes


def test_gated_activations_switch_between_qdq_and_float(tmp_path: Path) -> None:
    src, feeds = _mlp(tmp_path / "mlp.onnx"), _feeds(tmp_path / "feeds")
    compile_model(str(src), tmp_path / "q", BuildConfig(target="sim", calibrator="max",
                                                        calib=feeds), eval_data=None)
    model = onnx.load(str(tmp_path / "q" / "model" / "model.fp32.onnx"))
    recipe = Recipe.load(tmp_path / "q" / "model" / "recipe.json")
    acts = [t.tensor for t in recipe.tensors if t.kind == "activation"]
    assert len(acts) >= 2
    gated = gate_activations(write_qdq(model, recipe), acts)
    x = np.random.default_rng(2).standard_normal((5, 64)).astype(np.float32)

    def run(m: onnx.ModelProto, **gates: float) -> np.ndarray:
        options = ort.SessionOptions()  # the QDQ arithmetic exactly, no fused kernels
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(m.SerializeToString(), sess_options=options,
                                       providers=["CPUExecutionProvider"])
        feed = {"x": x} | {gate_name(t): np.array(v, np.float32) for t, v in gates.items()}
        return np.asarray(session.run(None, feed)[0])

    on = {t: 1.0 for t in acts}
    weights_only = replace(recipe, tensors=tuple(t for t in recipe.tensors
                                                 if t.kind == "weight"))
    qdq, float_acts = run(write_qdq(model, recipe)), run(write_qdq(model, weights_only))
    np.testing.assert_allclose(run(gated, **on), qdq, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run(gated, **{t: 0.0 for t in acts}), float_acts, rtol=1e-5,
                               atol=1e-5)
    one_off = run(gated, **(on | {acts[0]: 0.0}))
    assert np.abs(one_off - qdq).max() > 1e-4 and np.abs(one_off - float_acts).max() > 1e-4
    with pytest.raises(ValueError, match="no Q/DQ pair"):
        gate_activations(model, acts)


def test_activation_probes_leave_one_out_and_resume(tmp_path: Path) -> None:
    calls = []
    cost = {"g:a__quantized": 3.0, "g:b__quantized": 1.0, "h:c__quantized": 0.5}

    def objective(feed: dict[str, float]) -> float:
        calls.append(dict(feed))
        return sum(cost[k] * v for k, v in feed.items())

    tensors = {"g": ["a", "b"], "h": ["c"]}
    probes = probe_activations(objective, tensors, tmp_path / "p.json", "k", progress=False)
    assert probes.quantized == 4.5 and probes.float_ == 0.0
    assert probes.ranked() == [("g:a", 3.0), ("g:b", 1.0), ("h:c", 0.5)]
    assert len(calls) == 5
    assert probe_activations(objective, tensors, tmp_path / "p.json", "k",
                             progress=False) == probes
    assert len(calls) == 5  # resumed from the checkpoint, nothing re-measured


def test_guard_keeps_the_fewest_activations_that_meet_the_allowance() -> None:
    cost = {"g:a__quantized": 3.0, "g:b__quantized": 1.0, "h:c__quantized": 0.5}
    calls = []

    def objective(feed: dict[str, float]) -> float:
        calls.append(1)
        return 0.25 + sum(cost[k] * v for k, v in feed.items())

    tensors = {"g": ["a", "b"], "h": ["c"]}
    within = guard_activations(objective, tensors, GuardConfig(allowance=5.0), progress=False)
    assert within.kept == () and within.probes is None and within.met and len(calls) == 2
    result = guard_activations(objective, tensors, GuardConfig(allowance=1.2), progress=False)
    assert result.kept == ("g:a", "g:b") and result.steps == (1.75, 0.75) and result.met
    assert len(calls) == 2 + 6  # 2, 3 probes, 1 step (the first step is a probe)
    capped = guard_activations(objective, tensors, GuardConfig(allowance=0.1, max_float=1),
                               progress=False)
    assert capped.kept == ("g:a",) and not capped.met
    with pytest.raises(SfcError, match="act-guard-kl"):
        GuardConfig(allowance=-1.0)


def test_guard_measures_on_clips_the_search_did_not_tune_on() -> None:
    assert guard_clips(100, 16, 16) == range(16, 32)
    assert guard_clips(20, 16, 16) == range(4, 20)  # too few: the last ones
    assert guard_clips(4, 16, 2) == range(2, 4)
    assert guard_clips(3, 0, 16) == range(0, 3)


def _tied(path: Path, feeds: Path) -> tuple[Path, Path]:
    """x, tokens -> x + E[tokens] -> MatMul(w1) -> MatMul(E): a table read by a Gather
    and by a MatMul (Whisper's tied embedding/logits table), and one plain weight."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), n)
             for n in ("E", "w1")]
    nodes = [onnx.helper.make_node("Gather", ["E", "tokens"], ["e"], name="embed"),
             onnx.helper.make_node("Add", ["x", "e"], ["h"], name="add"),
             onnx.helper.make_node("MatMul", ["h", "w1"], ["h1"], name="fc1"),
             onnx.helper.make_node("MatMul", ["h1", "E"], ["y"], name="logits")]
    graph = onnx.helper.make_graph(
        nodes, "tied",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 64]),
         onnx.helper.make_tensor_value_info("tokens", onnx.TensorProto.INT64, ["n"])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 64])], inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    feeds.mkdir()
    for i in range(4):
        np.savez(feeds / f"{i}.npz", x=rng.standard_normal((8, 64)).astype(np.float32),
                 tokens=rng.integers(0, 64, 8))
    return path, feeds


@pytest.mark.parametrize("tied", ["mse", "gptq", "auto"])
def test_gptq_on_a_tied_table_as_asked(tmp_path: Path, tied: str) -> None:
    """"auto": 16 calibration rows per half for 64 features, so GPTQ's gain does not hold
    on the held-out half and the table rounds with MSE; the ratio is in the recipe."""
    src, feeds = _tied(tmp_path / "tied.onnx", tmp_path / "feeds")
    config = _config(feeds, weights=4, weight_method="gptq", gptq=GptqConfig(tied=tied))
    compile_model(str(src), tmp_path / "b", config, eval_data=None)
    recipe = Recipe.load(tmp_path / "b" / "model" / "recipe.json")
    methods = {t.tensor: t.method for t in recipe.tensors if t.kind == "weight"}
    assert methods == {"w1": "gptq", "E": "gptq" if tied == "gptq" else "mse"}
    weights = recipe.config["weights"]
    assert weights["gptq"].get("tied", "mse") == tied
    ratios = weights.get("tied_heldout_ratio", {})
    assert set(ratios) == ({"E"} if tied == "auto" else set())
    assert all(r > MAX_HELDOUT_RATIO for r in ratios.values())


def test_tied_table_check_under_mixed_runs_at_a_gptq_candidate(tmp_path: Path) -> None:
    """Under --weights mixed the table's plan spec is INT8 (no GPTQ): the check runs at its
    first GPTQ candidate (4/32), records the ratio, and the table rounds with MSE."""
    src, feeds = _tied(tmp_path / "tied.onnx", tmp_path / "feeds")
    search = SearchConfig(Budget(avg_bits=5.0), candidates=("8", "4/32", "2/32"), samples=3)
    config = _config(feeds, weights="mixed", search=search, weight_method="gptq")
    compile_model(str(src), tmp_path / "b", config, eval_data=None)
    recipe = Recipe.load(tmp_path / "b" / "model" / "recipe.json")
    methods = {t.tensor: t.method for t in recipe.tensors if t.kind == "weight"}
    assert methods["E"] == "mse" or methods["E"] == "absmax"  # absmax if it ends at INT8
    assert recipe.config["weights"]["tied_heldout_ratio"]["E"] > MAX_HELDOUT_RATIO


def test_gptq_tied_config_reads_old_recipes() -> None:
    base = {"damp": 0.01, "act_order": True, "lazy_block": 128, "scale_method": "mse"}
    assert GptqConfig.from_dict(base).tied == "mse"  # before the option: no key
    assert GptqConfig.from_dict({**base, "tied": True}).tied == "gptq"  # a bool, briefly
    assert GptqConfig.from_dict({**base, "tied": "auto"}) == GptqConfig()
    assert GptqConfig(tied="mse").to_dict() == base
    with pytest.raises(SfcError, match="tied must be one of"):
        GptqConfig(tied="yes")


class _AtTheSearch(Exception):
    pass


@pytest.mark.parametrize("stages, released", [(1, True), (2, False)])
def test_a_whisper_search_without_learning_runs_without_the_fp32_runtime(
        tiny_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stages: int,
        released: bool) -> None:
    """The FP32 runtime (1.15 GB on whisper-small) is gone before the probes, unless
    sequential GPTQ still reads its feeds."""
    import gc
    import weakref

    from sfc import build as build_module

    opened: list[weakref.ref[Any]] = []
    open_runtime = build_module._fp32_runtime

    def tracked(folder: Path) -> Any:
        runtime = open_runtime(folder)
        opened.append(weakref.ref(runtime))
        return runtime

    alive: list[bool] = []

    def at_search(*args: Any, **kwargs: Any) -> None:
        gc.collect()
        alive.append(opened[0]() is not None)
        raise _AtTheSearch

    monkeypatch.setattr(build_module, "_fp32_runtime", tracked)
    monkeypatch.setattr(build_module, "choose", at_search)
    search = SearchConfig(Budget(avg_bits=6.0), candidates=("8", "4/32"), samples=1)
    config = BuildConfig(activations=None, calibrator="mse", weights="mixed", search=search,
                         weight_method="gptq", gptq=GptqConfig(stages=stages), calib_limit=1)
    with pytest.raises(_AtTheSearch):
        build_module.build(str(tiny_export), tmp_path / "out", config)
    assert alive == [not released]
