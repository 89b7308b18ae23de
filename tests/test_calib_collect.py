"""collect_stats on a small ONNX graph, checked against running it and keeping everything."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sfc.calib import MaxCalib, collect_stats, compute_scale
from sfc.calib import stats as stats_module
from sfc.calib.stats import StatsPass
from sfc.errors import SfcError


def _model() -> onnx.ModelProto:
    """x[N, 8] -> MatMul(W1) -> h -> Relu -> r -> MatMul(W2) -> y[N, 4]."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "W1")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "W2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["y"])],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [w1, w2],
    )
    # onnx 1.23 writes IR 14 by default; ORT 1.31 reads up to 13.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _feeds(n: int = 5) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": (rng.standard_normal((3 + i, 8)) * (1 + i)).astype(np.float32)}
            for i in range(n)]


def _reference(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> dict:
    """Run a copy with every tensor as an output and keep all of it."""
    full = onnx.ModelProto()
    full.CopyFrom(model)
    for name in ("h", "r"):
        full.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(full.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = [sess.run(["h", "r", "y"], f) for f in feeds]
    return {name: np.concatenate([o[i].ravel() for o in outs])
            for i, name in enumerate(["h", "r", "y"])}


def test_stats_match_keeping_everything() -> None:
    model, feeds = _model(), _feeds()
    before = model.SerializeToString()
    stats = collect_stats(model, ["h", "r", "y", "x"], feeds, bins=64, progress=None)
    assert model.SerializeToString() == before  # the caller's model is untouched
    ref = _reference(model, feeds)
    ref["x"] = np.concatenate([f["x"].ravel() for f in feeds])
    assert list(stats) == ["h", "r", "y", "x"]
    for name, values in ref.items():
        s = stats[name]
        assert s.count == values.size
        assert s.absmax == float(np.abs(values).max())
        assert (s.min, s.max) == (float(values.min()), float(values.max()))
    assert stats["r"].min == 0.0
    assert compute_scale(stats["h"], MaxCalib()).threshold == stats["h"].absmax


def test_model_from_path_with_progress(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "mlp.onnx"
    onnx.save(_model(), str(path))
    stats = collect_stats(path, ["r"], iter(_feeds(3)), total=3, threads=1)
    assert stats["r"].count == (3 + 4 + 5) * 16
    assert "calibrating" in capsys.readouterr().err


def test_large_model_path_via_external_data(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend every model is over protobuf's 2 GB limit: the session loads from a file.
    monkeypatch.setattr(stats_module, "_MAX_INLINE_BYTES", 0)
    model, feeds = _model(), _feeds(2)
    stats = collect_stats(model, ["h"], feeds, progress=None)
    assert stats["h"].absmax == float(np.abs(_reference(model, feeds)["h"]).max())


def test_nan_input_names_tensor() -> None:
    feeds = _feeds(3)
    feeds[1]["x"][0, 0] = np.nan
    with pytest.raises(SfcError, match=r"NaN in activation statistics of tensor 'h'.*feed #1"):
        collect_stats(_model(), ["h"], feeds, progress=None)


def test_unknown_and_bad_requests() -> None:
    with pytest.raises(SfcError, match=r"unknown tensor.*'nope'"):
        collect_stats(_model(), ["h", "nope"], _feeds(), progress=None)
    with pytest.raises(SfcError, match="initializer"):
        collect_stats(_model(), ["W1"], _feeds(), progress=None)
    with pytest.raises(SfcError, match="empty"):
        collect_stats(_model(), ["h"], [], progress=None)
    with pytest.raises(SfcError, match="not found"):
        collect_stats("/nonexistent/model.onnx", ["h"], _feeds(), progress=None)
    with pytest.raises(SfcError, match="ONNX Runtime failed"):
        collect_stats(_model(), ["h"], [{"x": np.zeros((2, 3), np.float32)}], progress=None)


def test_a_pass_counts_as_collect_stats_and_hands_back_what_it_keeps() -> None:
    model, feeds = _model(), _feeds()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    with StatsPass(model, ["h", "r"], bins=64, keep=["y"]) as counting:
        kept = [counting.add(f) for f in feeds]
        stats = counting.result()
    for feed, values in zip(feeds, kept, strict=True):
        assert len(values) == 1
        np.testing.assert_allclose(values[0], session.run(["y"], feed)[0], rtol=1e-6)
    plain = collect_stats(model, ["h", "r"], feeds, bins=64, progress=None)
    assert list(stats) == ["h", "r"]
    for name in stats:
        assert stats[name].absmax == plain[name].absmax
        np.testing.assert_array_equal(stats[name].hist, plain[name].hist)


def test_a_pass_keeps_only_graph_outputs() -> None:
    with pytest.raises(SfcError, match="'r' is not an output"):
        StatsPass(_model(), ["h"], keep=["r"])


def test_grams_alone_feed_their_accumulators_without_histograms(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor asked for by `grams` only (GPTQ's Gram sums, smoothing's channel maxima)
    reaches its accumulator, and no histogram is kept for it."""
    model, feeds = _model(), _feeds()
    histogrammed: list[str] = []
    update = stats_module.TensorStats.update

    def counting(self: stats_module.TensorStats, values: np.ndarray) -> None:
        histogrammed.append(self.name)
        update(self, values)

    monkeypatch.setattr(stats_module.TensorStats, "update", counting)

    class Seen:
        def __init__(self) -> None:
            self.values: list[np.ndarray] = []

        def update(self, x: np.ndarray) -> None:
            self.values.append(x)

    seen = Seen()
    stats = collect_stats(model, ["r"], feeds, bins=64, progress=None, grams={"h": seen})
    assert list(stats) == ["r"] and set(histogrammed) == {"r"}
    ref = _reference(model, feeds)["h"]
    assert np.array_equal(np.concatenate([v.ravel() for v in seen.values]), ref)
