"""benchmarks/profile_transcribe.py: profile parsing, GEMM FLOPs from real ORT traces of
hand-built graphs, the limit arithmetic, the microbenchmark models, the timing split, and
(slow) the whole script on tiny.en against FLOPs derived from Whisper's dimensions."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sfc.card import GraphSpec
from sfc.runtime.features import LogMelSpec
from sfc.runtime.whisper import Transcript
from tests.conftest import bench_module

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
SCRIPT = BENCH / "profile_transcribe.py"


@pytest.fixture(scope="module")
def pt() -> Any:
    """The script as a module (it imports its sibling `common` by name)."""
    return bench_module("profile_transcribe")


def _kernel(name: str, op: str, ts: int, dur: int) -> dict[str, Any]:
    return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur,
            "args": {"op_name": op}}


def test_split_runs_groups_kernels_by_run_and_sums_op_types(pt: Any) -> None:
    events = [
        {"cat": "Session", "name": "model_loading_uri", "ts": 0, "dur": 50},
        {"cat": "Session", "name": "model_run", "ts": 100, "dur": 100},
        _kernel("a", "MatMul", 110, 30),
        _kernel("b", "Softmax", 150, 5),
        {"cat": "Node", "name": "b_fence_before", "ts": 149, "dur": 1,
         "args": {"op_name": "Softmax"}},
        {"cat": "Session", "name": "model_run", "ts": 300, "dur": 100},
        _kernel("a", "MatMul", 310, 20),
        _kernel("c", "Add", 330, 7),
    ]
    runs = pt.split_runs(events)
    assert [[e["name"] for e in r] for r in runs] == [
        ["a_kernel_time", "b_kernel_time"], ["a_kernel_time", "c_kernel_time"]]
    totals = pt.op_type_us(events)
    assert totals == {"MatMul": 30 + 20, "Add": 7, "Softmax": 5}
    assert list(totals) == ["MatMul", "Add", "Softmax"]  # largest first
    with pytest.raises(ValueError, match="outside"):
        pt.split_runs([*events, _kernel("late", "Add", 450, 1)])


def _profiled_run(tmp_path: Path, model: onnx.ModelProto,
                  feeds: dict[str, np.ndarray], pt: Any) -> list[Any]:
    """GEMMs of one profiled ORT run of `model`, through the script's own session."""
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    spec = GraphSpec(path=path.name, inputs=(), outputs=(), optimization="all")
    session = pt.profiling_session(tmp_path, spec, 1, tmp_path, "g")
    session.run(None, feeds)
    runs = pt.split_runs(json.loads(Path(session.end_profiling()).read_text()))
    graph = onnx.load(str(tmp_path / "g.onnx"), load_external_data=False).graph
    (run,) = runs
    gemms: list[Any] = pt.gemms_of_run(graph, run)
    return gemms


def test_gemm_flops_from_an_ort_profile_of_a_hand_built_graph(pt: Any, tmp_path: Path) -> None:
    m, k, n, p = 5, 16, 24, 8  # X[m,k] @ W1[k,n] -> Gemm with W2[p,n] transposed
    b, s, d = 3, 7, 4  # Q[b,s,d] @ Kt[b,d,s]: two activations
    c, length, out_ch = 6, 20, 10  # Conv1d, kernel 3, pad 1, stride 2
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal((p, n), dtype=np.float32), "W2"),
             numpy_helper.from_array(rng.standard_normal((out_ch, c, 3), dtype=np.float32),
                                     "CW")]
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["H"], name="mm"),
             helper.make_node("Gemm", ["H", "W2"], ["Y"], name="gemm", transB=1),
             helper.make_node("MatMul", ["Q", "Kt"], ["Z"], name="attn"),
             helper.make_node("Conv", ["S", "CW"], ["C"], name="conv", kernel_shape=[3],
                              pads=[1, 1], strides=[2])]
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("X", f, [m, k]),
         helper.make_tensor_value_info("Q", f, [b, s, d]),
         helper.make_tensor_value_info("Kt", f, [b, d, s]),
         helper.make_tensor_value_info("S", f, [1, c, length])],
        [helper.make_tensor_value_info(o, f, None) for o in ("Y", "Z", "C")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"X": rng.standard_normal((m, k), dtype=np.float32),
             "Q": rng.standard_normal((b, s, d), dtype=np.float32),
             "Kt": rng.standard_normal((b, d, s), dtype=np.float32),
             "S": rng.standard_normal((1, c, length), dtype=np.float32)}
    gemms = _profiled_run(tmp_path, model, feeds, pt)

    out_len = (length + 2 - 3) // 2 + 1
    expected = {"mm": 2 * m * k * n, "gemm": 2 * m * n * p, "attn": 2 * b * s * d * s,
                "conv": 2 * out_len * out_ch * c * 3}
    assert {g.node: g.flops for g in gemms} == expected
    by_node = {g.node: g for g in gemms}
    assert by_node["attn"].shape == pt.GemmShape(batch=b, m=s, k=d, n=s, weight=False)
    assert by_node["conv"].shape == pt.GemmShape(batch=1, m=out_len, k=c * 3, n=out_ch,
                                                 weight=True)
    assert by_node["mm"].shape.weight and by_node["mm"].kind == pt.FP32


def test_int8_gemm_counts_as_int8_at_its_weight_shape(pt: Any, tmp_path: Path) -> None:
    m, k, n = 4, 32, 12
    rng = np.random.default_rng(1)
    model = pt.gemm_model(pt.INT8, pt.GemmShape(1, m, k, n, True), 1, rng)
    (gemm,) = _profiled_run(tmp_path, model, {"A": rng.integers(0, 256, (m, k), np.uint8)}, pt)
    assert gemm.op_type == "MatMulIntegerToFloat" and gemm.kind == pt.INT8
    assert gemm.shape == pt.GemmShape(batch=1, m=m, k=k, n=n, weight=True)


def test_multihead_attention_counts_as_its_two_products(pt: Any, tmp_path: Path) -> None:
    b, t, keys, heads, d = 1, 12, 9, 2, 8  # query [b, t, H*d], key/value [b, keys, H*d]
    rng = np.random.default_rng(4)
    f = TensorProto.FLOAT
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], name="mha",
                            domain="com.microsoft", num_heads=heads)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("q", f, [b, t, heads * d]),
         *(helper.make_tensor_value_info(n, f, [b, keys, heads * d]) for n in "kv")],
        [helper.make_tensor_value_info("o", f, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    feeds = {"q": rng.standard_normal((b, t, heads * d), dtype=np.float32),
             **{n: rng.standard_normal((b, keys, heads * d), dtype=np.float32) for n in "kv"}}
    gemms = _profiled_run(tmp_path, model, feeds, pt)
    assert [g.shape for g in gemms] == [
        pt.GemmShape(batch=b * heads, m=t, k=d, n=keys, weight=False),
        pt.GemmShape(batch=b * heads, m=t, k=keys, n=d, weight=False)]
    assert all(g.kind == pt.FP32 and g.op_type == "MultiHeadAttention" for g in gemms)
    assert sum(g.flops for g in gemms) == 2 * 2 * b * heads * t * keys * d
    assert gemms[0].us == gemms[1].us > 0


def test_unnamed_gemm_nodes_are_refused(pt: Any, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    model = pt.gemm_model(pt.FP32, pt.GemmShape(1, 2, 8, 4, True), 1, rng)
    model.graph.node[0].name = ""  # the trace would call it MatMul_0, the graph ""
    with pytest.raises(ValueError, match="named GEMM nodes"):
        _profiled_run(tmp_path, model, pt.gemm_inputs(pt.FP32, pt.GemmShape(1, 2, 8, 4, True),
                                                      rng), pt)


def test_gemm_shape_reads_transposed_and_4bit_operands(pt: Any) -> None:
    fused = helper.make_node("FusedMatMul", ["A", "B"], ["Y"], domain="com.microsoft",
                             transA=1)
    # A is [batch, k, m] when transposed: k = 9 is its second-last axis.
    assert pt.gemm_shape(fused, [2, 9, 5], [2, 5, 7], {}) == pt.GemmShape(2, 5, 9, 7, False)
    def nbits(**level: Any) -> onnx.NodeProto:
        return helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft",
                                K=64, N=32, bits=4, block_size=32, **level)

    assert pt.gemm_shape(nbits(), [1, 3, 64], [1, 3, 32], {}) == pt.GemmShape(1, 3, 64, 32,
                                                                              True)
    assert pt.gemm_kind(nbits(accuracy_level=4)) == pt.INT8
    assert pt.gemm_kind(nbits()) == pt.FP32  # dequantized to FP32


def test_limit_sums_flops_over_rates_per_precision(pt: Any) -> None:
    big = pt.GemmShape(1, 100, 64, 32, True)
    small = pt.GemmShape(6, 1, 64, 10, False)
    gemms = [pt.Gemm("a", "MatMulIntegerToFloat", pt.INT8, big, 1.0),
             pt.Gemm("b", "MatMul", pt.FP32, small, 1.0)]
    rates = {(pt.INT8, big): 4e9, (pt.FP32, big): 1e9,
             (pt.INT8, small): 1e8, (pt.FP32, small): 2e8}
    f_big, f_small = 2 * 100 * 64 * 32, 2 * 6 * 64 * 10
    assert pt.limit_seconds(gemms, rates) == pytest.approx(f_big / 4e9 + f_small / 2e8)
    assert pt.limit_seconds(gemms, rates, pt.INT8) == pytest.approx(f_big / 4e9 + f_small / 1e8)
    assert pt.limit_seconds(gemms, rates, pt.FP32) == pytest.approx(f_big / 1e9 + f_small / 2e8)
    assert pt.limit_seconds(gemms, rates, pt.BEST) == pytest.approx(f_big / 4e9 + f_small / 2e8)
    lim = pt.limits(gemms, rates, measured_s=0.001, per=2)
    assert lim["flops"] == (f_big + f_small) / 2
    assert lim["limit_as_run_s"] == pytest.approx((f_big / 4e9 + f_small / 2e8) / 2)
    assert lim["fraction_as_run"] == pytest.approx(lim["limit_as_run_s"] / 0.001)
    assert pt.limits(gemms, rates, measured_s=None)["fraction_best"] is None


@pytest.mark.parametrize("kind", ["fp32", "int8"])
@pytest.mark.parametrize("weight", [True, False])
def test_microbenchmark_model_computes_its_gemm(pt: Any, kind: str, weight: bool) -> None:
    shape = pt.GemmShape(batch=1 if weight else 3, m=4, k=8, n=5, weight=weight)
    rng = np.random.default_rng(2)
    model = pt.gemm_model(kind, shape, 3, rng)
    feeds = pt.gemm_inputs(kind, shape, rng)
    outs = ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, feeds)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert len(outs) == 3
    for i, y in enumerate(outs):
        b = inits[f"W{i}"] if weight else feeds["B"]
        a = feeds["A"]
        if kind == "int8":
            ref = (0.02 * 0.001) * ((a.astype(np.int64) - 128) @ b.astype(np.int64))
        else:
            ref = a.astype(np.float64) @ b.astype(np.float64)
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    if weight:  # every copy its own weights, as a model's layers
        assert not np.array_equal(outs[0], outs[1])


def test_copies_give_small_products_enough_work(pt: Any) -> None:
    tiny = pt.GemmShape(1, 1, 384, 384, True)
    assert pt.copies_for(tiny) == min(pt.MAX_COPIES, math.ceil(pt.TARGET_FLOPS / tiny.flops))
    assert pt.copies_for(pt.GemmShape(1, 1500, 384, 1536, True)) == 1


@pytest.mark.parametrize(("arg", "expected"), [
    ("w8a8=/tmp/b/build", ("w8a8", "/tmp/b/build")),
    ("/tmp/b/build/", ("build", "/tmp/b/build/")),
    ("whisper-tiny.en", ("whisper-tiny.en", "whisper-tiny.en")),
])
def test_model_argument(pt: Any, arg: str, expected: tuple[str, str]) -> None:
    assert pt.parse_model_arg(arg) == expected


def test_model_labels_must_differ(pt: Any) -> None:
    with pytest.raises(SystemExit):
        pt.parse_args(["--model", "a=x", "--model", "a=y"])
    with pytest.raises(SystemExit):
        pt.parse_args(["--model", "=x"])


class _FakeSession:
    def run(self, names: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.zeros(1)]


@dataclass
class _StubRuntime:
    """Runs like `WhisperRuntime.transcribe`: features through the runtime module's
    `whisper_windows`, one encoder run, then as many decoder steps as the clip's first
    sample says."""

    encoder: Any
    decoder: Any
    mel: LogMelSpec = field(default_factory=LogMelSpec)

    def transcribe(self, audio: np.ndarray) -> Transcript:
        import sfc.runtime.whisper as whisper_runtime

        windows = whisper_runtime.whisper_windows(audio, self.mel)
        self.encoder.run(None, {"input_features": windows})
        for i in range(int(audio[0])):
            past = np.zeros((4, 1, 6, 0 if i == 0 else i + 1, 64), np.float32)
            self.decoder.run(None, {"tokens": np.zeros((1, 2 if i == 0 else 1), np.int64),
                                    "past_key": past})
        return Transcript("text")


def test_timing_pass_splits_each_clip_and_leaves_out_the_warm_up(pt: Any) -> None:
    audios = [np.full(16000, v, np.float32) for v in (3.0, 5.0)]
    result = pt.timing_pass(_StubRuntime(_FakeSession(), _FakeSession()), audios, ["a", "b"])
    clips = result["clips"]
    assert [c["steps"] for c in clips] == [3, 5]
    assert [c["audio_s"] for c in clips] == [1.0, 1.0]
    assert all(c["features_s"] > 0 for c in clips)  # the runtime's feature call was timed
    assert len(result["encoder_runs"]) == 2 and result["encoder_runs"][0]["batch"] == 1
    steps = result["decoder_steps"]
    assert [(s["tokens"], s["past"]) for s in steps[:3]] == [(2, 0), (1, 2), (1, 3)]
    for c in clips:
        parts = c["features_s"] + c["encoder_s"] + c["decoder_s"] + c["python_s"]
        assert parts == pytest.approx(c["total_s"])
    split = pt.time_split(result)
    assert split["decoder_steps"] == 8
    assert sum(p["share"] for p in split["parts"].values()) == pytest.approx(1.0)


def _tiny_encoder_flops() -> int:
    """whisper-tiny.en's encoder per 30 s window from its dimensions (d 384, 4 layers,
    FFN 1536, 80 mels, 3000 frames -> 1500 positions), with the cross K/V it exports."""
    d, ffn, t, layers = 384, 1536, 1500, 4
    convs = 2 * 3000 * d * 80 * 3 + 2 * t * d * d * 3
    per_layer = (4 * 2 * t * d * d  # q, k, v, out projections
                 + 2 * 2 * t * t * d  # scores and weighted values over 6 heads of 64
                 + 2 * 2 * t * d * ffn  # fc1, fc2
                 + 2 * 2 * t * d * d)  # cross-attention K and V for the decoder
    return convs + layers * per_layer


def _tiny_step_flops(past: int) -> int:
    """One decoder token of whisper-tiny.en with `past` cached positions."""
    d, ffn, layers, vocab, frames = 384, 1536, 4, 51864, 1500
    per_layer = (4 * 2 * d * d + 2 * 2 * d * d + 2 * 2 * d * ffn
                 + 2 * 2 * (past + 1) * d + 2 * 2 * frames * d)
    return layers * per_layer + 2 * d * vocab


@pytest.mark.slow
def test_whole_script_on_tiny_export(tiny_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", f"fp32={tiny_export}", "--limit", "2",
         "--profile-clips", "1", "--gemm-seconds", "0.02", "--json", str(out)],
        capture_output=True, text=True, timeout=600, check=False, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GEMM work against this CPU's limit" in proc.stdout
    report = json.loads(out.read_text())
    model = report["models"]["fp32"]
    summary = model["summary"]
    assert summary["encoder_window"]["flops"] == _tiny_encoder_flops()
    step = summary["decoder_step"]
    assert step["flops"] == _tiny_step_flops(step["past"])
    ops = model["profile"]["encoder"]["op_type_us"]
    assert "MatMul" in ops and "Conv" in ops
    assert summary["time_split"]["clips"] == 2
    assert {r["kind"] for r in report["gemm_rates"]} == {"fp32", "int8"}
