"""The benchmarker: workers in separate processes, interleaved rounds, JSON round trips.

Fast tests use a tiny onnx.helper model; one slow test runs the real whisper-tiny.en export.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sfc.bench import BenchReport, LocalDevice, bench, get_device, render
from sfc.bench.results import (
    WorkerArgs,
    WorkerResult,
    latency_stats,
    parse_output,
    summarize_variant,
)
from sfc.bench.worker import ort_inputs, random_feed
from sfc.errors import SfcError

FAST = {"runs": 15, "warmup": 2, "progress": False}


def tiny_model() -> onnx.ModelProto:
    """y = relu(x @ W), x [batch, 256]: well under a millisecond, well above timer noise."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((256, 256)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 256])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "tiny.onnx"
    onnx.save(tiny_model(), str(path))
    return path


def _check_stats(report: BenchReport) -> None:
    for v in report.variants:
        lat = v.latency
        assert 0 < lat.p50 <= lat.p90 <= lat.p99
        assert lat.mean > 0 and v.throughput > 0 and v.peak_rss_kib > 0
        assert len(v.rounds) == report.rounds
        assert all(len(r.latency_ms) == report.runs for r in v.rounds)


def test_generic_bench_against_itself(tiny: Path, tmp_path: Path) -> None:
    report = bench([tiny], baseline=tiny, rounds=3, threads=1, dims={"batch": 32}, **FAST)
    assert [v.label for v in report.variants] == ["tiny.onnx", "tiny.onnx#2"]
    assert report.baseline == "tiny.onnx"
    _check_stats(report)
    assert report.variant("tiny.onnx").ratio == 1.0
    ratio = report.variant("tiny.onnx#2").ratio
    assert ratio is not None and 0.5 < ratio < 2.0  # same artifact: 1 up to timing noise
    assert report.variants[0].bytes == tiny.stat().st_size
    assert report.device == "cpu" and report.device_info["cores"] >= 1
    assert report.device_info["onnxruntime"] and report.device_info["timing"] == "wall clock"
    assert all(v.device_stats is None for v in report.variants)  # no GPU, no tegrastats
    # Round trip through JSON, exactly.
    report.save(tmp_path / "bench.json")
    assert BenchReport.load(tmp_path / "bench.json") == report
    assert render(report).row_count == 2


def test_dims_and_npz_inputs(tiny: Path, tmp_path: Path) -> None:
    small = bench([tiny], rounds=1, dims={"batch": 1}, **FAST).variants[0]
    big = bench([tiny], rounds=1, dims={"batch": 512}, **FAST).variants[0]
    assert big.latency.p50 > small.latency.p50  # the symbolic batch really took the value
    npz = tmp_path / "in.npz"
    np.savez(npz, x=np.ones((8, 256), np.float32))
    assert bench([tiny], rounds=1, inputs=npz, **FAST).variants[0].latency.p50 > 0
    np.savez(npz, wrong=np.ones((8, 256), np.float32))
    with pytest.raises(SfcError, match=r"tiny.onnx failed: .*lacks input\(s\) x"):
        bench([tiny], rounds=1, inputs=npz, **FAST)


def test_lowered_artifacts_bench(tiny: Path, tmp_path: Path) -> None:
    """An .ort.onnx and an .ort file from the ort-cpu target both run in the worker."""
    from sfc.targets import get_target

    get_target("ort-cpu").lower(tiny, tmp_path)
    report = bench([tmp_path / "model.ort.onnx", tmp_path / "model.ort"], rounds=1, **FAST)
    assert [v.label for v in report.variants] == ["model.ort.onnx", "model.ort"]
    _check_stats(report)
    assert report.baseline is None and all(v.ratio is None for v in report.variants)


def test_devices() -> None:
    for kind in ("cpu", "cuda", "jetson"):
        dev = get_device(kind)
        assert isinstance(dev, LocalDevice) and dev.kind == kind == dev.name
    with pytest.raises(SfcError, match="unknown device 'tpu'; choose from cpu, cuda, jetson"):
        get_device("tpu")
    with pytest.raises(SfcError, match="unknown device kind 'tpu'"):
        WorkerArgs(device="tpu")


def test_bad_settings_and_paths(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(SfcError, match="unknown device"):
        bench([tiny], device="tpu", **FAST)
    with pytest.raises(SfcError, match="runs >= 1"):
        bench([tiny], runs=0, progress=False)
    with pytest.raises(SfcError, match="artifact not found"):
        bench([tmp_path / "none.onnx"], **FAST)
    with pytest.raises(SfcError, match=r"has no card\.json"):
        bench([tmp_path], **FAST)
    with pytest.raises(SfcError, match="nothing to benchmark"):
        bench([], **FAST)


def test_worker_command_line(tiny: Path) -> None:
    """The worker is a plain command: one JSON line out, exit 2 with a WorkerError."""
    args = WorkerArgs(artifact=str(tiny), runs=3, warmup=0)
    done = subprocess.run([sys.executable, "-m", "sfc.bench.worker", *args.argv()],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().splitlines()) == 1
    result = WorkerResult.from_dict(json.loads(done.stdout))
    assert result.kind == "generic" and len(result.latency_ms) == 3
    bad = WorkerArgs(artifact="/no/such/file.onnx").argv()
    done = subprocess.run([sys.executable, "-m", "sfc.bench.worker", *bad],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert parse_output(done.stdout)["_type"] == "WorkerError"


# --- pure pieces ----------------------------------------------------------------------------

def test_latency_stats_match_numpy() -> None:
    samples = list(np.random.default_rng(3).gamma(2.0, 5.0, size=57))
    s = latency_stats(samples)
    np.testing.assert_allclose([s.p50, s.p90, s.p99], np.percentile(samples, [50, 90, 99]))
    assert s.mean == pytest.approx(np.mean(samples)) and s.n == 57
    with pytest.raises(SfcError):
        latency_stats([])


def _wr(lat: float, rtf: float | None = None) -> WorkerResult:
    return WorkerResult(artifact="a", kind="whisper" if rtf else "generic", threads=None,
                        load_s=0.1, latency_ms=(lat, lat, lat), peak_rss_kib=1000,
                        decoder_step_ms=(9.0, 2.0, 4.0) if rtf else (),
                        audio_s=10.0 if rtf else 0.0, transcribe_s=10.0 * rtf if rtf else 0.0)


def test_ratio_is_median_of_per_round_ratios() -> None:
    base = [_wr(10.0, 0.1), _wr(20.0, 0.1), _wr(10.0, 0.2)]
    mine = [_wr(5.0, 0.05), _wr(30.0, 0.1), _wr(20.0, 0.1)]
    v = summarize_variant("q", "a", 123, mine, base)
    assert v.ratio == pytest.approx(1.5)  # per-round 0.5, 1.5, 2.0
    assert v.rtf_ratio == pytest.approx(0.5)  # per-round 0.5, 1.0, 0.5
    assert v.latency.p50 == 20.0  # median of per-round p50s 5, 30, 20
    assert v.rtf == pytest.approx(0.1)
    assert v.decoder_step is not None and v.decoder_step.p50 == 3.0  # prompt step excluded
    assert v.throughput == pytest.approx(50.0)  # median of 1000/5, 1000/30, 1000/20


def testrandom_feed_uses_dims() -> None:
    metas = [SimpleNamespace(name="x", type="tensor(float)", shape=["batch", 80, None]),
             SimpleNamespace(name="ids", type="tensor(int64)", shape=["batch", "seq"])]
    feed = random_feed(ort_inputs(metas), {"batch": 3}, seed=0)
    assert feed["x"].shape == (3, 80, 1) and feed["x"].dtype == np.float32
    assert feed["ids"].shape == (3, 1) and feed["ids"].dtype == np.int64
    with pytest.raises(SfcError, match=r"give its values in an \.npz"):
        ort_inputs([SimpleNamespace(name="s", type="tensor(string)", shape=[1])])


def test_report_rejects_foreign_json(tmp_path: Path) -> None:
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"_type": "EvalResult", "_version": 1, "_data": {}}))
    with pytest.raises(SfcError, match="unknown bench result type 'EvalResult'"):
        BenchReport.load(p)
    p.write_text(json.dumps({"_type": "BenchReport", "_version": 7, "_data": {}}))
    with pytest.raises(SfcError, match="unsupported BenchReport version 7"):
        BenchReport.load(p)
    with pytest.raises(SfcError, match="not found"):
        BenchReport.load(tmp_path / "missing.json")


@pytest.mark.slow
def test_whisper_tiny_bench() -> None:
    """The real export: encoder windows, decoder steps and RTF on bundled clips."""
    from sfc.models import model_folder
    from sfc.runtime.whisper import WhisperRuntime

    folder = model_folder("whisper-tiny.en")
    report = bench([folder], baseline=folder, runs=2, warmup=1, rounds=2, threads=2,
                   progress=False)
    _check_stats(report)
    card = WhisperRuntime.open(folder).card
    for v in report.variants:
        assert v.kind == "whisper"
        assert v.bytes == sum((folder / g.path).stat().st_size for g in card.graphs.values())
        assert v.rtf is not None and 0 < v.rtf < 5
        assert v.decoder_step is not None and v.decoder_step.p50 > 0
        assert all(r.audio_s > 0 and len(r.decoder_step_ms) > 2 for r in v.rounds)
    assert len(report.clips) == 4
    assert 0.3 < (report.variants[1].ratio or 0) < 3
