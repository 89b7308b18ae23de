"""Segmented probe sessions: the cuts a graph has, and runs that start at one giving the
same outputs as the whole graph."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_quant_graphs import speech_model

from sfc.build import BuildConfig
from sfc.calib.objectives import GraphSetup, ScaledSession
from sfc.calib.segments import gate_cuts, single_tensor_cuts, split_at
from sfc.pipeline import compile_model
from sfc.precision.activations import gate_activations, gate_name
from sfc.quant.recipe import Recipe
from tests.test_build import _feeds, _mlp


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SFC_CACHE", str(tmp_path / "cache"))


def test_cuts_are_the_tensors_everything_later_depends_on() -> None:
    graph = speech_model().graph
    # The residual stream (h0, res, enc) and the chain's ends; never a tensor with another
    # one still live beside it (ln with h0, f1 with res, logits with emb).
    assert [t for _, t in single_tensor_cuts(graph)] == ["conv", "h0", "res", "enc", "logits"]
    names = [n.name for n in graph.node]
    assert [names[i] for i, _ in single_tensor_cuts(graph)] == [
        "conv", "to_btd", "residual1", "residual2", "lm_head"]


def test_a_gate_gets_the_last_cut_before_its_first_reader() -> None:
    graph = speech_model().graph
    # ids is read by the last node, feats by the first: one cut, and none.
    assert gate_cuts(graph, ["ids", "feats"]) == ["logits"]
    with pytest.raises(ValueError, match="not a single-tensor cut"):
        split_at(speech_model(), ["ln"])


def test_segments_compose_to_the_graph() -> None:
    model = speech_model()
    segments = split_at(model, ["h0", "enc"])
    assert [(s.start, s.end) for s in segments] == [(None, "h0"), ("h0", "enc"), ("enc", None)]
    assert segments[0].inputs == {"feats"} and segments[2].inputs == {"enc", "ids"}
    # Every node once, and only the initializers each segment reads.
    assert sorted(n.name for s in segments for n in s.model.graph.node) == sorted(
        n.name for n in model.graph.node)
    assert {t.name for t in segments[0].model.graph.initializer} == {"conv.w", "conv.b"}
    for s in segments:
        onnx.checker.check_model(s.model)


def _gated_mlp(tmp_path: Path) -> tuple[GraphSetup, list[str]]:
    src, feeds = _mlp(tmp_path / "mlp.onnx"), _feeds(tmp_path / "feeds")
    compile_model(str(src), tmp_path / "q", BuildConfig(target="ort-cpu", calibrator="max",
                                                        calib=feeds), eval_data=None)
    model = onnx.load(str(tmp_path / "q" / "model" / "model.fp32.onnx"))
    recipe = Recipe.load(tmp_path / "q" / "model" / "recipe.json")
    acts = tuple(t.tensor for t in recipe.tensors if t.kind == "activation")
    gates = tuple(gate_name(t) for t in acts)
    return GraphSetup(model, recipe, (), gates,
                      rewrite=lambda m: gate_activations(m, acts)), list(gates)


def test_a_segmented_probe_equals_the_whole_graph_bit_for_bit(tmp_path: Path) -> None:
    setup, gates = _gated_mlp(tmp_path)
    assert len(gates) >= 2
    whole = ScaledSession("g", setup)
    parts = ScaledSession("g", setup, segmented=True)
    assert parts.segments is not None and len(parts.segments.segments) >= 2
    rng = np.random.default_rng(3)
    windows = [{"x": rng.standard_normal((4, 64)).astype(np.float32)} for _ in range(2)]
    # All on first (it leaves the cut values), then every other mix, then all on again.
    mixes = [dict(zip(gates, bits, strict=True))
             for bits in itertools.product((1.0, 0.0), repeat=len(gates))]
    for mix in [*mixes, mixes[0]]:
        scales = {f"g:{g}": v for g, v in mix.items()}
        for feed in windows:
            np.testing.assert_array_equal(parts.run(None, feed, scales)[0],
                                          whole.run(None, feed, scales)[0])
    # A probe runs only the segments from the last cut before its gate on.
    runs = [0] * len(parts.segments.sessions)

    class Counted:
        def __init__(self, j: int, session: object) -> None:
            self.j, self.session = j, session

        def run(self, *args: object) -> object:
            runs[self.j] += 1
            return self.session.run(*args)  # type: ignore[attr-defined]

    parts.segments.sessions = [Counted(j, s) for j, s in enumerate(parts.segments.sessions)]
    last_gate = next(g for g in reversed(gates) if g in parts.segments.gates[-1])
    parts.run(None, windows[0], {f"g:{g}": float(g != last_gate) for g in gates})
    assert runs[-1] == 1 and sum(runs) == 1
    # One file per window and cut, all from all-on runs.
    assert len(list(Path(parts.segments._tmp.name).iterdir())) == 2 * (
        len(parts.segments.segments) - 1)
    folder = Path(parts.segments._tmp.name)
    parts.close()
    whole.close()
    assert not folder.exists()


def test_a_segmented_session_takes_gates_alone(tmp_path: Path) -> None:
    setup, _ = _gated_mlp(tmp_path)
    with pytest.raises(ValueError, match="gates alone"):
        ScaledSession("g", GraphSetup(setup.model, setup.recipe, ()), segmented=True)


def test_a_graph_out_of_topological_order_is_refused() -> None:
    model = speech_model()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend([nodes[1], nodes[0], *nodes[2:]])
    with pytest.raises(ValueError, match="not in topological order"):
        single_tensor_cuts(model.graph)
