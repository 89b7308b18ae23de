"""benchmarks/gpu_check.py without a GPU: its arithmetic, lookup, rendering and time guard,
its refusal on a machine without CUDA, and its whole flow in --cpu-smoke mode."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
SCRIPT = BENCH / "gpu_check.py"


@pytest.fixture(scope="module")
def gc() -> Any:
    """The script as a module (with its sibling gpu_kernels, which it imports by name)."""
    sys.path.insert(0, str(BENCH))
    try:
        importlib.import_module("gpu_kernels")
        return importlib.import_module("gpu_check")
    finally:
        sys.path.remove(str(BENCH))


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False, cwd=REPO)


# Names as torch.cuda.get_device_properties reports them; bandwidths from NVIDIA datasheets.
@pytest.mark.parametrize(("name", "board", "gbps"), [
    ("NVIDIA H200", "", 4800.0),
    ("NVIDIA H100 80GB HBM3", "", 3350.0),
    ("NVIDIA H100 PCIe", "", 2000.0),
    ("NVIDIA A100-SXM4-80GB", "", 2039.0),
    ("NVIDIA A100 80GB PCIe", "", 1935.0),
    ("NVIDIA L4", "", 300.0),
    ("Orin", "NVIDIA Jetson AGX Orin Developer Kit", 204.8),
    ("Orin", "NVIDIA Jetson Orin Nano Developer Kit", None),  # another bandwidth: unknown
    ("NVIDIA GH200 480GB", "", None),  # not an H200
    ("NVIDIA L40S", "", None),  # not an L4
    ("NVIDIA H100 NVL", "", None),
    ("NVIDIA GeForce RTX 4090", "", None),
])
def test_hbm_peak_lookup(gc: Any, name: str, board: str, gbps: float | None) -> None:
    peak = gc.hbm_peak(name, board)
    assert (None if peak is None else peak.gbps) == gbps
    if peak is not None:
        assert "datasheet" in peak.source or "data sheet" in peak.source


def test_timing_row_rates(gc: Any) -> None:
    import gpu_kernels as gk

    shape = gk.Shape("tiny", "fc1", 1, 384, 1536)
    # INT4 weight (2 per byte) + fp32 scales per 32 rows + fp16 activations in and out.
    moved = 384 * 1536 // 2 + (384 // 32) * 1536 * 4 + 2 * 384 + 2 * 1536
    row = gc.timing_row(shape, "triton-w4a16", (16, 64, 32), 0.01, 32, 4800.0, 0.02)
    assert row.bytes == moved
    assert row.gbps == pytest.approx(moved / 1e-5 / 1e9)
    assert row.hbm_percent == pytest.approx(100 * row.gbps / 4800.0)
    assert row.tflops == pytest.approx(2 * 384 * 1536 / 1e-5 / 1e12)
    assert row.vs_fp16 == pytest.approx(2.0)
    assert row.tiles == [16, 64, 32]
    unknown = gc.timing_row(shape, "triton-w4a16", None, 0.01, 32, None, None)
    assert unknown.gbps == pytest.approx(row.gbps)
    assert unknown.hbm_percent is None and unknown.vs_fp16 is None
    untimed = gc.timing_row(shape, "triton-w4a16", None, None, 32, 4800.0, 0.02)
    assert (untimed.ms, untimed.gbps, untimed.hbm_percent, untimed.tflops,
            untimed.vs_fp16) == (None, None, None, None, None)
    assert untimed.bytes == moved


def test_checked_rows(gc: Any) -> None:
    assert list(gc.checked_rows(1)) == [0]
    assert list(gc.checked_rows(100, 128)) == list(range(100))
    rows = gc.checked_rows(1500, 128)
    assert len(rows) == len(set(rows)) == 128
    assert rows.min() == 0 and rows.max() == 1499
    assert set(range(1472, 1500)) <= set(rows)  # the partial 64-row tile at the end


def test_compare(gc: Any) -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 8)).astype(np.float32)
    good = gc.compare(ref.astype(np.float16).astype(np.float32), ref, "float")
    assert good.ok and good.max_abs_error <= good.limit and good.rel_error < 1e-3
    bad = ref.copy()
    bad[2, 3] += 0.5
    res = gc.compare(bad, ref, "float")
    assert not res.ok and res.max_abs_error == pytest.approx(0.5)
    nan = ref.copy()
    nan[0, 0] = np.nan
    assert not gc.compare(nan, ref, "float").ok
    recorded = gc.compare(bad, ref, "float", judged=False)
    assert recorded.ok and not recorded.judged and recorded.max_abs_error == pytest.approx(0.5)
    acc = rng.integers(-2**30, 2**30, (3, 5)).astype(np.int32)
    assert gc.compare(acc.copy(), acc, "int32").mismatches == 0
    off = acc.copy()
    off[1, 1] += 1
    res = gc.compare(off, acc, "int32")
    assert not res.ok and res.mismatches == 1 and res.max_abs_error == 1.0
    assert not gc.compare(ref[:2], ref, "float").ok


def test_deadline(gc: Any) -> None:
    now = [100.0]
    d = gc.Deadline(60.0, clock=lambda: now[0])
    assert d.allows(60.0) and d.elapsed() == 0.0
    now[0] = 130.0
    assert d.left() == 30.0 and d.allows(30.0) and not d.allows(30.5)
    now[0] = 170.0
    assert d.left() == -10.0 and not d.allows(0.0)


def test_default_budget_fits_8_minutes(gc: Any) -> None:
    assert gc.BUDGET_S + gc.FINISH_RESERVE_S < 8 * 60
    assert gc.parse_args([]).budget_s == gc.BUDGET_S


def test_check_shapes(gc: Any) -> None:
    shapes = gc.check_shapes(gc.MODELS, (1, 1500), quick=False)
    assert len(shapes) == 3 * 3 * 2
    ms = [s.m for s in shapes]
    assert ms == sorted(ms)  # every decode shape before the first prefill shape
    for model, d in {"tiny": 384, "base": 512, "large-v3": 1280}.items():
        dims = {(s.k, s.n) for s in shapes if s.model == model}
        assert dims == {(d, d), (d, 4 * d), (4 * d, d)}
    quick = gc.check_shapes(gc.MODELS, (1, 1500), quick=True)
    assert {(s.layer, s.n // s.k) for s in quick} == {("fc1", 4)} and len(quick) == 6


def test_gpu_busy_from_trace(gc: Any) -> None:
    trace = {"traceEvents": [
        {"ph": "X", "cat": "kernel", "ts": 0, "dur": 10},
        {"ph": "X", "cat": "gpu_memcpy", "ts": 5, "dur": 10},  # overlaps: counted once
        {"ph": "X", "cat": "gpu_memset", "ts": 30, "dur": 2},
        {"ph": "X", "cat": "cuda_runtime", "ts": 0, "dur": 100},  # host side: not GPU time
        {"ph": "X", "cat": "cpu_op", "ts": 0, "dur": 100},
        {"ph": "i", "cat": "kernel", "ts": 50},
    ]}
    intervals = gc.gpu_intervals(trace)
    assert sorted(intervals) == [(0.0, 10.0), (5.0, 15.0), (30.0, 32.0)]
    assert gc.busy_time(intervals) == pytest.approx(17.0)
    assert gc.busy_time([(0.0, 10.0), (2.0, 3.0)]) == pytest.approx(10.0)
    assert gc.busy_time([]) == 0.0


def test_host_overhead(gc: Any) -> None:
    res = gc.host_overhead([2.0, 3.0, 4.0], busy_ms=6.0, profiled_steps=4)
    assert res["wall_ms_mean"] == pytest.approx(3.0) and res["wall_ms_median"] == 3.0
    assert res["gpu_busy_ms_per_step"] == pytest.approx(1.5)
    assert res["host_overhead_ms_per_step"] == pytest.approx(1.5)
    assert res["host_fraction"] == pytest.approx(0.5)
    unknown = gc.host_overhead([2.0], busy_ms=None, profiled_steps=4)
    assert unknown["host_overhead_ms_per_step"] is None and unknown["host_fraction"] is None


def test_concrete_shape(gc: Any) -> None:
    assert gc.concrete_shape((4, "batch", 6, 1500, 64)) == (4, 1, 6, 1500, 64)


def _timing(gc: Any, model: str, layer: str, m: int, kind: str, ms: float,
            peak: float | None) -> dict[str, Any]:
    import gpu_kernels as gk

    d = gc.MODELS[model]
    shape = gk.Shape(model, layer, m, d, 4 * d)
    return asdict(gc.timing_row(shape, kind, None, ms, 32, peak, 2 * ms, ms + 0.01))


def test_kernel_table(gc: Any) -> None:
    timings = [_timing(gc, "tiny", "fc1", m, kind, ms, 4800.0)
               for m, ms in ((1, 0.004), (1500, 0.05))
               for kind in ("triton-w4a16", "torch-fp16")]
    failed = [("tiny", "fc1", 1500, 384, 1536, "triton-w2a16")]
    table = gc.kernel_table(timings, failed, 1, 1500, peak_known=True)
    lines = table.splitlines()
    assert lines[0].startswith("| model | layer |") and "M=1 % HBM peak" in lines[0]
    assert len(lines) == 2 + 3
    fp16, w4, w2 = lines[2:]
    assert "torch-fp16" in fp16 and "triton-w4a16" in w4 and "triton-w2a16" in w2
    cells = [c.strip() for c in w4.strip("|").split("|")]
    assert cells[4] == "4.0" and cells[9] == "50.0"  # 0.004 / 0.05 ms, in microseconds
    assert cells[8] == "14.0"  # the eager launch: 0.01 ms more
    assert cells[7] == "2.00" and cells[11] == "2.00"  # fp16 took twice as long
    assert float(cells[6]) == pytest.approx(timings[0]["hbm_percent"], abs=0.05)
    w2_cells = [c.strip() for c in w2.strip("|").split("|")]
    assert w2_cells[4:9] == ["—"] * 5 and w2_cells[9:] == ["FAIL"] * 3
    unknown = gc.kernel_table([_timing(gc, "tiny", "fc1", 1, "torch-fp16", 0.004, None)], [],
                              1, 1500, peak_known=False)
    assert [c.strip() for c in unknown.splitlines()[2].strip("|").split("|")][6] == ""


def _report(gc: Any, peak: dict[str, Any] | None, decoder: dict[str, Any]) -> dict[str, Any]:
    return {
        "mode": "full", "date": "2026-12-03", "budget_s": 450.0, "elapsed_s": 300.0,
        "decode_prefill_m": [1, 1500],
        "device": {"gpu": True, "name": "NVIDIA Example GPU", "capability": "9.0", "sms": 132,
                   "memory_gib": 80.0, "driver": "580.1", "cuda": "13.0", "torch": "2.11",
                   "triton": "3.6", "onnxruntime": "1.30", "hbm_peak": peak},
        "kernels": {"block_size": 32, "repeats": 50, "skipped": [],
                    "correctness": [{"model": "tiny", "layer": "fc1", "m": 1, "k": 384,
                                     "n": 1536, "kind": "torch-fp16", "ok": True}],
                    "timings": [_timing(gc, "tiny", "fc1", 1, "torch-fp16", 0.004,
                                        None if peak is None else peak["gbps"])]},
        "decoder": decoder,
        "memory": {"torch_max_allocated_bytes": 3 << 30, "nvml_used_bytes": 5 << 30,
                   "nvml_note": None},
    }


def test_render_report(gc: Any) -> None:
    skipped = {"status": "skipped", "reason": "onnxruntime 1.30 has no CUDAExecutionProvider"}
    text = gc.render_report(_report(gc, None, skipped))
    assert "NVIDIA Example GPU" in text and "compute 9.0" in text
    assert "HBM peak unknown for NVIDIA Example GPU" in text
    assert "no CUDAExecutionProvider" in text
    assert "3072 MiB" in text and "5120 MiB" in text
    peak = {"gbps": 4800.0, "product": "H200", "source": "NVIDIA H200 datasheet"}
    measured = {"status": "measured", "model": "whisper-tiny.en", "provider": "CUDA",
                "steps": 48, "utterances": 3, "wall_ms_mean": 2.0,
                "gpu_busy_ms_per_step": 0.5, "host_overhead_ms_per_step": 1.5,
                "host_fraction": 0.75}
    text = gc.render_report(_report(gc, peak, measured))
    assert "HBM peak 4800 GB/s" in text and "unknown" not in text
    assert "host overhead 1.500 ms (75%)" in text


def test_refuses_without_gpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    done = run_script("--out", str(out))
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "no CUDA GPU" in done.stderr
    assert not out.exists() and "GB/s" not in done.stdout


def _smoke(tmp_path: Path, decoder: str) -> tuple[subprocess.CompletedProcess[str],
                                                    dict[str, Any]]:
    pytest.importorskip("triton", reason="triton is not installed; the kernels need it")
    out = tmp_path / "smoke.json"
    done = run_script("--cpu-smoke", "--out", str(out), "--decoder", decoder, "--seed", "7",
                      timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done, json.loads(out.read_text())


def _assert_no_numbers(report: dict[str, Any]) -> None:
    assert report["mode"] == "cpu-smoke" and not report["device"]["gpu"]
    assert report["memory"] is None and report["device"]["hbm_peak"] is None
    timings = report["kernels"]["timings"]
    assert timings and all(t[f] is None for t in timings
                           for f in ("ms", "gbps", "hbm_percent", "tflops", "vs_fp16"))
    assert "not a GPU measurement" in report["table_md"]


def test_cpu_smoke_runs_the_flow(tmp_path: Path) -> None:
    done, report = _smoke(tmp_path, str(tmp_path / "no-such-export"))
    _assert_no_numbers(report)
    checks = report["kernels"]["correctness"]
    # 2 M values x 3 layers, each W4A16, W2A16, W8A8 and the int32 accumulator.
    # Per shape: W4A16 and W2A16 unsplit and split in two, W8A8, the int8 accumulator.
    assert len(checks) == 2 * 3 * 6 and all(c["ok"] for c in checks)
    assert {tuple(c["tiles"]) for c in checks if c["kind"] == "triton-w4a16"} == {
        (16, 32, 32, 1), (16, 32, 32, 2)}
    assert {c["m"] for c in checks} == {1, 17}
    assert all(c["max_abs_error"] is not None for c in checks)
    assert report["decoder"]["status"] == "skipped"
    assert "no-such-export" in report["decoder"]["reason"]
    assert "not a GPU measurement" in done.stdout and "µs" in done.stdout


@pytest.mark.slow
def test_cpu_smoke_steps_the_decoder(tmp_path: Path, tiny_export: Path) -> None:
    _, report = _smoke(tmp_path, str(tiny_export))
    _assert_no_numbers(report)
    dec = report["decoder"]
    assert dec["status"] == "ran" and dec["steps"] == 16
    assert dec["provider"] == "CPUExecutionProvider" and "wall_ms_mean" not in dec


def test_imports_sfc_from_the_checkout_when_not_installed() -> None:
    code = textwrap.dedent(f"""
        import importlib.util, sys
        def editable(f):
            return getattr(f, "__module__", "").startswith("__editable__")
        sys.meta_path[:] = [f for f in sys.meta_path if not editable(f)]
        sys.path_hooks[:] = [h for h in sys.path_hooks if not editable(h)]
        sys.path_importer_cache.clear()
        if importlib.util.find_spec("sfc") is not None:
            print("INSTALLED"); raise SystemExit
        sys.path.insert(0, {str(BENCH)!r})
        import gpu_check
        gpu_check.import_sfc()
        from sfc.kernels.packing import pack
        import sfc.kernels, sfc.errors
        print(sfc.__file__); print(sfc.kernels.__file__); print(pack.__module__)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    if done.stdout.strip() == "INSTALLED":
        pytest.skip("sfc is installed non-editable here: the shim is not needed")
    sfc_file, kernels_file, module = done.stdout.split()
    assert Path(sfc_file) == REPO / "compiler" / "__init__.py"
    assert Path(kernels_file) == REPO / "kernels" / "__init__.py"
    assert module == "sfc.kernels.packing"


@pytest.mark.slow
def test_decoder_loop_matches_plain_runs(gc: Any, tiny_export: Path) -> None:
    """The IO-bound loop (cache kept as OrtValues) computes what plain session.run does."""
    import onnxruntime as ort

    from sfc.card import ModelCard
    from sfc.runtime.decoding import suppression_mask

    card = ModelCard.load(tiny_export)
    spec, graph = card.decoding, card.graphs["decoder"]
    assert spec is not None
    sess = ort.InferenceSession(str(tiny_export / graph.path), providers=["CPUExecutionProvider"])
    cross = {t.name: gc.concrete_shape(t.shape) for t in graph.inputs
             if t.name.startswith("cross_")}

    class Recording:  # the session, keeping each step's logits
        def __init__(self) -> None:
            self.logits: list[np.ndarray] = []

        def io_binding(self) -> Any:
            return sess.io_binding()

        def run_with_iobinding(self, io: Any) -> None:
            sess.run_with_iobinding(io)
            self.logits.append(io.get_outputs()[0].numpy().copy())

    rec = Recording()
    assert len(gc._decoder_utterance(rec, spec, cross, "cpu", 4, np.random.default_rng(5))()) == 4
    rng = np.random.default_rng(5)
    cross_feed = {name: rng.standard_normal(shape).astype(np.float32)
                  for name, shape in cross.items()}  # drawn in the order the check binds
    pk = pv = np.zeros((spec.n_layers, 1, spec.n_heads, 0, spec.head_dim), np.float32)
    tokens = np.asarray([spec.prompt], dtype=np.int64)
    for i, got in enumerate(rec.logits):
        logits, pk, pv = sess.run(None, {"tokens": tokens, "past_key": pk, "past_value": pv,
                                         **cross_feed})
        np.testing.assert_array_equal(got, logits)
        last = logits[:, -1].copy()
        last[:, suppression_mask(spec, i == 0)] = -np.inf
        tokens = last.argmax(-1)[:, None].astype(np.int64)
