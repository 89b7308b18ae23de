"""The GPU check: the first thing to run on any CUDA machine (issue 12, item 6).

In at most 8 minutes on one GPU (a 7-minute time guard: no shape or part starts past it,
leaving room for the one under way; ``--quick``: fc1 layers only, fewer repeats) it
measures, and writes to one JSON plus one markdown table for BENCHMARKS.md:

1. **Kernels.** sfc's Triton W4A16 / W2A16 / W8A8 kernels (``kernels/triton_gemm.py``) and
   ``torch.matmul`` in fp16 on Whisper Linear shapes: tiny / base / large-v3 (d_model 384 /
   512 / 1280; q/k/v/out d x d, fc1 d x 4d, fc2 4d x d). At M = 1 (decode, memory-bound):
   microseconds, GB/s (activations + weights + scales + output, each moved once) and % of
   the GPU's datasheet HBM bandwidth; at M = 1500 (encoder/prefill): TFLOP/s (int8: TOP/s).
   Before anything is timed, every kernel and tile configuration is checked against the
   float64 numpy references (``sfc.kernels.reference``) on fresh random inputs (the seed is
   printed and saved): max abs error and relative error (at M = 1500 on the first and last 64
   rows: rows are independent, and the last ones fill a partial tile). A wrong kernel is
   printed as FAIL, not timed, and makes the script exit 1. Timing: CUDA events around a
   CUDA-graph replay of each call (GPU time, as an engine launches it), L2 flushed before
   every repeat (a 256 MiB memset, as triton.testing.do_bench does, so M = 1 weights come
   from HBM as in a real decoder step), warm-up, median of repeats; the best of the tile
   configurations (and K splits) of benchmarks/gpu_kernels.py per kernel, then timed once
   more launched eagerly from Python (host launch included).
2. **Decoder-step host overhead.** The whisper-tiny.en decoder export (``--decoder``:
   a zoo name or an export folder; the zoo's is made in $SFC_CACHE on first use) on ONNX
   Runtime's CUDA provider, standing in for the TensorRT engine runner where TensorRT is
   missing: IO binding keeps the cross K/V and the self-attention cache on the device, only
   the logits come back. Per step: wall time (bind, run, logits to the host, greedy argmax
   with sfc's suppression mask) minus GPU busy time (the kernel and copy intervals CUPTI
   records through torch.profiler). Skipped with the reason in the JSON when ORT has no
   CUDA provider, no export is at hand, or the time guard says no.
3. **Memory**: ``torch.cuda.max_memory_allocated`` and NVML's used memory (nvidia-ml-py).
4. **The device**: name, compute capability, driver and CUDA versions, and HBM peak from a
   table of datasheet values (``KNOWN_GPUS``); for another GPU the % column stays empty and
   the table says so.

It refuses with one line and exit status 2 when no CUDA GPU is visible: it never prints a
number that was not measured.

On the ``run`` device tool (from the repository root; nothing needs installing: without an
installed sfc the script imports it from this checkout)::

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json

with ``timeout_s`` 540 (the JSON is rewritten after every shape, so a run cut short still
returns what it measured). ``pip install --no-deps --no-build-isolation -e .`` installs sfc
there without the network instead (``--no-build-isolation``: the build uses the installed
setuptools instead of fetching one).

``--cpu-smoke`` runs the same flow on tiny shapes on the CPU (Triton's interpreter, ONNX
Runtime's CPU provider) to prove the script runs end to end; it records no timings and is
labelled as not a GPU measurement.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu_check.json"
SMOKE_OUT = Path(tempfile.gettempdir()) / "gpu_check.cpu-smoke.json"
BUDGET_S = 420.0  # the time guard: 8 minutes less a shape or part already under way
DECODER_RESERVE_S = 90.0  # kept for the decoder part while kernels are timed (export included)
FINISH_RESERVE_S = 10.0  # memory, table and JSON
MODELS = {"tiny": 384, "base": 512, "large-v3": 1280}  # Whisper d_model; the MLP is 4x
DECODE_M, PREFILL_M = 1, 1500
SMOKE_MODELS, SMOKE_MS = {"smoke-d40": 40}, (1, 17)  # K = 40 leaves a partial scale block
CHECK_ROWS = 128
MAX_ABS_TOL = 5e-3  # of max |reference|: ~10x fp16 output rounding (2**-11)
FLUSH_BYTES = 256 << 20
KIND_ORDER = ("torch-fp16", "triton-w4a16", "triton-w2a16", "triton-w8a8", "torch-int-mm")
GPU_ACTIVITY = ("kernel", "gpu_memcpy", "gpu_memset")  # torch.profiler trace categories

Timer = Callable[[Callable[[], object]], float | None]


def import_sfc(repo: Path = REPO) -> None:
    """Make `import sfc` work from this checkout when sfc is not installed.

    pyproject.toml maps the package `sfc` to compiler/ and `sfc.kernels` to kernels/, so no
    sys.path entry can do it: both packages are registered from their folders.
    """
    if importlib.util.find_spec("sfc") is not None:
        return
    for name, folder in (("sfc", repo / "compiler"), ("sfc.kernels", repo / "kernels")):
        spec = importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)])
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {name} from {folder}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)


# ---------------------------------------------------------------------------------------
# Plain functions (tested without a GPU)


@dataclass(frozen=True)
class HbmPeak:
    """A GPU's datasheet memory bandwidth."""

    gbps: float
    product: str
    source: str


# Datasheet memory bandwidths, matched on the CUDA device name (and, for Jetson, the board
# model: every Orin module reports the GPU name "Orin" but they differ in bandwidth).
# - H100: NVIDIA H100 Tensor Core GPU datasheet: SXM 3.35 TB/s, PCIe 2 TB/s (NVL, 3.9 TB/s,
#   is left unknown). https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet
# - H200: NVIDIA H200 Tensor Core GPU datasheet: 4.8 TB/s (SXM and NVL).
#   https://www.nvidia.com/en-us/data-center/h200/ (GH200 is another product: not matched)
# - A100 80GB: NVIDIA A100 Tensor Core GPU datasheet: PCIe 1,935 GB/s, SXM 2,039 GB/s.
#   https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
# - L4: NVIDIA L4 Tensor Core GPU datasheet: 300 GB/s. https://www.nvidia.com/en-us/data-center/l4/
# - Jetson AGX Orin: Jetson AGX Orin Series data sheet / technical brief: 204.8 GB/s LPDDR5
#   (shared by CPU and GPU). https://developer.nvidia.com/embedded/jetson-modules
KNOWN_GPUS: tuple[tuple[str, str, HbmPeak], ...] = (
    (r"\bH200\b", "", HbmPeak(4800.0, "H200", "NVIDIA H200 datasheet")),
    (r"\bH100\b.*\bPCIe\b", "", HbmPeak(2000.0, "H100 PCIe", "NVIDIA H100 datasheet")),
    (r"\bH100\b.*\b(SXM\d?|HBM3)\b", "", HbmPeak(3350.0, "H100 SXM", "NVIDIA H100 datasheet")),
    (r"\bA100\b.*\b80GB\b.*\bPCIe\b", "",
     HbmPeak(1935.0, "A100 80GB PCIe", "NVIDIA A100 datasheet")),
    (r"\bA100\b.*\bSXM4?-80GB\b", "", HbmPeak(2039.0, "A100 80GB SXM", "NVIDIA A100 datasheet")),
    (r"\bL4\b", "", HbmPeak(300.0, "L4", "NVIDIA L4 datasheet")),
    (r"\bOrin\b", r"\bAGX Orin\b",
     HbmPeak(204.8, "Jetson AGX Orin", "NVIDIA Jetson AGX Orin data sheet")),
)


def hbm_peak(gpu_name: str, board: str = "") -> HbmPeak | None:
    """The datasheet bandwidth of `gpu_name` (Jetson: and `board`), or None if unknown."""
    for name_re, board_re, peak in KNOWN_GPUS:
        if re.search(name_re, gpu_name, re.IGNORECASE) and (
                not board_re or re.search(board_re, board, re.IGNORECASE)):
            return peak
    return None


@dataclass
class Deadline:
    """The global time guard: a budget from construction on, read from `clock`."""

    budget_s: float
    clock: Callable[[], float] = time.monotonic
    start: float = field(init=False)

    def __post_init__(self) -> None:
        self.start = self.clock()

    def elapsed(self) -> float:
        """Seconds since the start."""
        return self.clock() - self.start

    def left(self) -> float:
        """Seconds of budget left (negative once over)."""
        return self.budget_s - self.elapsed()

    def allows(self, need_s: float) -> bool:
        """Whether `need_s` seconds are still left."""
        return self.left() >= need_s


def check_shapes(models: dict[str, int], ms: Sequence[int], quick: bool) -> list[Any]:
    """Whisper Linear layers (q/k/v/out, fc1, fc2; fc1 only when `quick`) at each M, the
    first M (decode) for every model before the next M."""
    import gpu_kernels as gk

    layers = [("fc1", 1, 4)] if quick else [("q/k/v/out", 1, 1), ("fc1", 1, 4), ("fc2", 4, 1)]
    return [gk.Shape(model, layer, m, kf * d, nf * d)
            for m in ms for model, d in models.items() for layer, kf, nf in layers]


def checked_rows(m: int, limit: int = CHECK_ROWS) -> np.ndarray:
    """Rows compared with the reference: all, or the first and last limit/2 (the last ones
    lie in the partial M tile)."""
    if m <= limit:
        return np.arange(m)
    return np.concatenate([np.arange(limit // 2), np.arange(m - limit // 2, m)])


@dataclass(frozen=True)
class CheckResult:
    """One kernel run against its reference (`judged` False: recorded, never failed)."""

    ok: bool
    judged: bool
    max_abs_error: float | None
    limit: float | None
    rel_error: float | None
    mismatches: int | None
    error: str | None = None


def compare(got: np.ndarray, expected: np.ndarray, how: str, judged: bool = True) -> CheckResult:
    """Max abs and relative error of float outputs (NaN/Inf fail); exact equality of int32."""
    from gpu_kernels import FLOAT_TOL, rel_error

    if got.shape != expected.shape:
        return CheckResult(False, judged, None, None, None, None,
                           f"shape {got.shape}, expected {expected.shape}")
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    if how == "int32":
        mismatches = int((got != expected).sum())
        return CheckResult(mismatches == 0 or not judged, judged, max_abs, 0.0, None, mismatches)
    if not np.isfinite(got).all():
        return CheckResult(not judged, judged, None, None, None, None,
                           "NaN/Inf in the output (unwritten?)")
    limit = MAX_ABS_TOL * max(float(np.abs(expected).max(initial=0.0)), 1e-30)
    rel = rel_error(got, expected)
    ok = (rel <= FLOAT_TOL and max_abs <= limit) or not judged
    return CheckResult(ok, judged, max_abs, limit, rel, None)


@dataclass(frozen=True)
class KernelTiming:
    """One kernel on one shape: median time and the rates derived from it (None: untimed)."""

    model: str
    layer: str
    m: int
    k: int
    n: int
    kind: str
    tiles: list[int] | None
    ms: float | None
    bytes: int
    gbps: float | None
    hbm_percent: float | None
    tflops: float | None
    vs_fp16: float | None
    eager_ms: float | None = None  # launched from Python each time (host launch included)


def timing_row(shape: Any, kind: str, tiles: Sequence[int] | None, ms: float | None,
               block_size: int, peak_gbps: float | None, fp16_ms: float | None,
               eager_ms: float | None = None) -> KernelTiming:
    """GB/s = bytes moved / time, % of the HBM peak, TFLOP/s = 2*M*N*K / time, speed-up."""
    from gpu_kernels import bytes_moved

    moved = bytes_moved(kind, shape, block_size)
    gbps = None if ms is None else moved / ms / 1e6
    return KernelTiming(
        shape.model, shape.layer, shape.m, shape.k, shape.n, kind,
        None if tiles is None else list(tiles), ms, moved, gbps,
        None if gbps is None or peak_gbps is None else 100.0 * gbps / peak_gbps,
        None if ms is None else 2.0 * shape.m * shape.n * shape.k / ms / 1e9,
        None if ms is None or fp16_ms is None else fp16_ms / ms, eager_ms)


def gpu_intervals(trace: dict[str, Any]) -> list[tuple[float, float]]:
    """(start, end) in microseconds of the GPU's kernels, copies and memsets in a
    torch.profiler chrome trace."""
    return [(float(e["ts"]), float(e["ts"]) + float(e["dur"]))
            for e in trace.get("traceEvents", [])
            if e.get("ph") == "X" and e.get("cat") in GPU_ACTIVITY]


def busy_time(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of `intervals` (overlapping streams are counted once)."""
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def host_overhead(wall_ms: Sequence[float], busy_ms: float | None,
                  profiled_steps: int) -> dict[str, float | None]:
    """Per decoder step: wall time, GPU busy time, and the difference (the host's share)."""
    mean = statistics.fmean(wall_ms)
    busy = None if busy_ms is None else busy_ms / profiled_steps
    return {"wall_ms_mean": mean, "wall_ms_median": statistics.median(wall_ms),
            "gpu_busy_ms_per_step": busy,
            "host_overhead_ms_per_step": None if busy is None else mean - busy,
            "host_fraction": None if busy is None else (mean - busy) / mean}


def concrete_shape(shape: Sequence[int | str]) -> tuple[int, ...]:
    """A card's tensor shape with every named (dynamic) axis set to 1 (batch 1)."""
    return tuple(d if isinstance(d, int) else 1 for d in shape)


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "—" if value is None else format(value * scale, spec)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]], left: int = 1) -> str:
    """A GitHub markdown table: the first `left` columns left-aligned, the rest right."""
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join(["---"] * left + ["---:"] * (len(headers) - left)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def kernel_table(timings: Sequence[dict[str, Any]], failed: Iterable[tuple[Any, ...]],
                 decode_m: int, prefill_m: int, peak_known: bool) -> str:
    """One row per (layer, kernel): the decode-M and prefill-M numbers side by side.

    `failed`: (model, layer, m, k, n, kind) of kernels that failed their check ("FAIL").
    """
    bad = set(failed)
    keys: dict[tuple[Any, ...], dict[int, dict[str, Any]]] = {}
    for t in timings:
        keys.setdefault((t["model"], t["layer"], t["k"], t["n"], t["kind"]), {})[t["m"]] = t
    for model, layer, _m, k, n, kind in bad:
        keys.setdefault((model, layer, k, n, kind), {})

    def cells(key: tuple[Any, ...], m: int, parts: list[tuple[str, str, float]]) -> list[str]:
        model, layer, k, n, kind = key
        if (model, layer, m, k, n, kind) in bad:
            return ["FAIL"] * len(parts)
        t = keys[key].get(m, {})
        return [_fmt(t.get(f), spec, scale) for f, spec, scale in parts]

    layers = list(dict.fromkeys(key[:4] for key in keys))  # the layers in the order timed

    def order(key: tuple[Any, ...]) -> tuple[int, int]:
        kind = key[4]
        return layers.index(key[:4]), KIND_ORDER.index(kind) if kind in KIND_ORDER else 99

    rows = []
    for key in sorted(keys, key=order):
        model, layer, k, n, kind = key
        decode = cells(key, decode_m, [("ms", ".1f", 1e3), ("gbps", ".0f", 1.0),
                                       ("hbm_percent", ".1f", 1.0), ("vs_fp16", ".2f", 1.0),
                                       ("eager_ms", ".1f", 1e3)])
        if not peak_known and decode[2] == "—":
            decode[2] = ""  # unknown GPU: the column is left empty, and the caption says so
        prefill = cells(key, prefill_m, [("ms", ".1f", 1e3), ("tflops", ".1f", 1.0),
                                         ("vs_fp16", ".2f", 1.0)])
        rows.append([model, layer, f"{k}x{n}", kind, *decode, *prefill])
    return markdown_table(
        ["model", "layer", "KxN", "kernel", f"M={decode_m} µs", f"M={decode_m} GB/s",
         f"M={decode_m} % HBM peak", f"M={decode_m} x fp16", f"M={decode_m} eager µs",
         f"M={prefill_m} µs",
         f"M={prefill_m} TFLOP/s", f"M={prefill_m} x fp16"], rows, left=4)


def device_line(device: dict[str, Any]) -> str:
    """The device, as stated above the table."""
    if not device["gpu"]:
        return device["name"]
    return (f"{device['name']} (compute {device['capability']}, {device['sms']} SMs, "
            f"{device['memory_gib']:.0f} GiB) | driver {device.get('driver') or '?'} | "
            f"CUDA {device['cuda']} | torch {device['torch']} | triton {device['triton']} | "
            f"onnxruntime {device.get('onnxruntime') or '?'}")


def render_report(report: dict[str, Any]) -> str:
    """The markdown block for BENCHMARKS.md: device, kernel table, decoder, memory, time."""
    device, kern = report["device"], report["kernels"]
    peak = device.get("hbm_peak")
    smoke = report["mode"] == "cpu-smoke"
    lines = ["**CPU SMOKE RUN: not a GPU measurement (Triton interpreter and ONNX Runtime "
             "on the CPU; no timings recorded).**" if smoke else
             f"**GPU check** ({report['mode']}, {report['date']}): {device_line(device)}"]
    if peak:
        lines.append(f"HBM peak {peak['gbps']:.0f} GB/s ({peak['product']}, {peak['source']}).")
    elif not smoke:
        lines.append(f"HBM peak unknown for {device['name']}: % column left empty.")
    if not smoke:
        lines.append(f"Kernels: block size {kern['block_size']}, median of {kern['repeats']} "
                     "CUDA-event timings after warm-up, L2 flushed before each, of a CUDA "
                     "graph replaying the call (GPU time, as an engine launches it); 'eager': "
                     "the same call launched from Python each time (host launch included); "
                     "best tile configuration (and K split); W8A8 and int_mm rates are TOP/s.")
    lines.append("")
    failed = [(c["model"], c["layer"], c["m"], c["k"], c["n"], c["kind"])
              for c in kern["correctness"] if not c["ok"]]
    ms = report["decode_prefill_m"]
    lines += [kernel_table(kern["timings"], failed, ms[0], ms[1], peak is not None), ""]
    if kern["skipped"]:
        lines.append(f"Not measured: {len(kern['skipped'])} shapes "
                     f"({kern['skipped'][0]['reason']}).")
    dec = report.get("decoder") or {"status": "skipped", "reason": "not reached"}
    if dec["status"] == "measured":
        lines.append(
            f"Decoder step ({dec['model']}, ONNX Runtime {dec['provider']}, IO binding, "
            f"{dec['steps']} steps x {dec['utterances']}): wall {_fmt(dec['wall_ms_mean'], '.3f')} "
            f"ms, GPU busy {_fmt(dec['gpu_busy_ms_per_step'], '.3f')} ms, host overhead "
            f"{_fmt(dec['host_overhead_ms_per_step'], '.3f')} ms "
            f"({_fmt(dec['host_fraction'], '.0f', 100)}%) per step.")
    elif dec["status"] == "ran":
        lines.append(f"Decoder step: ran {dec['steps']} steps ({dec['provider']}); not timed.")
    else:
        lines.append(f"Decoder step host overhead: not measured: {dec['reason']}")
    mem = report.get("memory") or {}
    if mem.get("torch_max_allocated_bytes") is not None:
        lines.append(f"GPU memory: torch peak allocated "
                     f"{mem['torch_max_allocated_bytes'] / 2**20:.0f} MiB; NVML used "
                     f"{_fmt(mem.get('nvml_used_bytes'), '.0f', 2**-20)} MiB "
                     f"({mem.get('nvml_note') or 'whole device, all processes'}).")
    lines.append(f"Elapsed: {report['elapsed_s']:.0f} s (budget {report['budget_s']:.0f} s).")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# The measurement (CUDA parts run only on a GPU; --cpu-smoke runs the rest on the CPU)


class CudaTimer:
    """Median CUDA-event time (ms) of one call; L2 flushed before every repeat.

    graph=True times the replay of a CUDA graph that captured the call: the GPU's time for
    its kernels alone, as a TensorRT engine (which launches from C++ and can use graphs)
    would see them. graph=False launches from Python every time: a small kernel then waits
    for the host, and that wait is in the time.
    """

    def __init__(self, warmup: int, repeats: int, graph: bool) -> None:
        import torch

        l2 = int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0))
        self.flush = torch.empty(max(FLUSH_BYTES, 4 * l2), dtype=torch.uint8, device="cuda")
        self.warmup, self.repeats, self.graph = warmup, repeats, graph

    def __call__(self, fn: Callable[[], object]) -> float:
        import torch

        for _ in range(self.warmup):
            fn()
        if self.graph:
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            fn = graph.replay
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(self.repeats)]
        for start, end in events:
            # The memset evicts the operands from L2 and keeps the GPU busy while the host
            # enqueues the call, so the events bracket GPU time, not launch latency.
            self.flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)


def no_timer(fn: Callable[[], object]) -> None:
    """--cpu-smoke: run the call once, record no time."""
    fn()


def _rows_of(inp: Any, rows: np.ndarray) -> Any:
    """`inp` with only `rows` of the activations (for the numpy references)."""
    sub = copy.copy(inp)
    sub.x, sub.xq = inp.x[rows], inp.xq[rows]
    return sub


def run_checked(run: Callable[[Any], Any], out: Any, how: str,
                rows: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """Run once into a poisoned buffer (if any); the checked rows of the result."""
    import torch
    from gpu_kernels import INT32_MIN

    if out is not None:
        out.fill_(float("nan") if how == "float" else INT32_MIN)
    result = run(out)
    if out is not None and result is not out:
        return None, "the launcher did not write into the given buffer"
    if result.is_cuda:
        torch.cuda.synchronize()
    picked = result[torch.as_tensor(rows, device=result.device)]
    return (picked.float() if how == "float" else picked).cpu().numpy(), None


def kernel_part(shapes: Sequence[Any], seed: int, block_size: int, timers: tuple[Timer, Timer],
                cuda: bool, peak_gbps: float | None, deadline: Deadline, reserve_s: float,
                save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Check every kernel run on every shape, then time the correct ones: every tile
    configuration with `timers[0]`, the best one once more with `timers[1]` (eager)."""
    timer, eager_timer = timers
    import gpu_kernels as gk

    rng = np.random.default_rng(seed)
    part: dict[str, Any] = {"block_size": block_size, "correctness": [], "timings": [],
                            "skipped": [], "max_abs_tol": MAX_ABS_TOL, "rel_tol": gk.FLOAT_TOL}
    for shape in shapes:
        if not deadline.allows(reserve_s):
            part["skipped"].append({**vars(shape), "reason": f"time guard ({deadline.left():.0f}"
                                    f" s left, {reserve_s:.0f} s reserved)"})
            continue
        t0 = time.perf_counter()
        inp = gk.Inputs(shape, rng, block_size, "cuda" if cuda else "cpu")
        rows = checked_rows(shape.m)
        expected = gk.references(_rows_of(inp, rows), shape)
        runs = gk.kernel_runs(inp, shape, cuda)
        failed: set[str] = set()
        n_bad = 0
        for kind, tiles, run, out, how in runs:
            try:
                got, error = run_checked(run, out, how, rows)
            except Exception as exc:  # e.g. a Triton compile error on this GPU: a failed check
                got, error = None, f"{type(exc).__name__}: {str(exc).strip()[:300]}"
            judged = kind != "torch-fp16"  # its fp16-rounded weight is recorded, not judged
            res = (CheckResult(False, judged, None, None, None, None, error) if got is None
                   else compare(got, expected[kind], how, judged))
            part["correctness"].append({**vars(shape), "kind": kind, "tiles": tiles,
                                        **asdict(res)})
            if not res.ok:
                failed.add(kind)
                n_bad += 1
                print(f"FAIL {kind} tiles={tiles} {shape.model} {shape.layer} M={shape.m} "
                      f"K={shape.k} N={shape.n}: {asdict(res)}", flush=True)
        best: dict[str, tuple[float | None, Any, Callable[[], object]]] = {}
        for kind, tiles, run, out, _ in runs:
            if kind == "triton-int8-acc" or kind in failed:
                continue  # the exact accumulator is checked; the scaled W8A8 kernel is timed
            call: Callable[[], object] = functools.partial(run, out)
            ms = timer(call)
            prev = best.get(kind)
            if prev is None or (ms is not None and (prev[0] is None or ms < prev[0])):
                best[kind] = (ms, tiles, call)
        fp16_ms = best.get("torch-fp16", (None, None, None))[0]
        for kind, (ms, tiles, call) in best.items():
            part["timings"].append(asdict(timing_row(shape, kind, tiles, ms, block_size,
                                                     peak_gbps, fp16_ms, eager_timer(call))))
        print(f"{shape.model} {shape.layer} M={shape.m} K={shape.k} N={shape.n}: "
              f"{len(runs) - n_bad}/{len(runs)} checks ok, {len(best)} kernels "
              f"{'timed' if cuda else 'run (not timed)'} "
              f"({time.perf_counter() - t0:.1f} s; {deadline.elapsed():.0f} s elapsed)",
              flush=True)
        save(part)
    return part


def ort_cuda_status() -> str | None:
    """None when ONNX Runtime offers its CUDA provider, else why not."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        return (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (providers: "
                f"{', '.join(available)}); install onnxruntime-gpu")
    return None


def _decoder_utterance(sess: Any, spec: Any, cross_shapes: dict[str, tuple[int, ...]],
                       device: str, steps: int,
                       rng: np.random.Generator) -> Callable[[], list[float]]:
    """Bind one utterance and return its loop of `steps` greedy decoder steps, which gives
    the wall ms of each step.

    Binding copies random cross K/V to the device once (the timed steps do not include it);
    each step's present K/V stay there as the next step's past (IO binding), the token goes
    in and only the logits come back to the host.
    """
    import onnxruntime as ort

    from sfc.runtime.decoding import suppression_mask

    io = sess.io_binding()
    for name, shape in cross_shapes.items():  # per layer, or stacked in older exports
        io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(
            rng.standard_normal(shape).astype(np.float32), device, 0))
    empty = np.zeros((spec.n_layers, 1, spec.n_heads, 0, spec.head_dim), dtype=np.float32)
    io.bind_cpu_input("past_key", empty)
    io.bind_cpu_input("past_value", empty)

    def loop() -> list[float]:
        tokens = np.asarray([spec.prompt], dtype=np.int64)
        walls = []
        for i in range(steps):
            t0 = time.perf_counter()
            io.bind_cpu_input("tokens", tokens)
            io.bind_output("logits")  # to the host: the only output that leaves the device
            io.bind_output("present_key", device)
            io.bind_output("present_value", device)
            sess.run_with_iobinding(io)
            logits, present_k, present_v = io.get_outputs()
            last = logits.numpy()[:, -1, :]
            last[:, suppression_mask(spec, i == 0)] = -np.inf
            tokens = last.argmax(axis=-1)[:, None].astype(np.int64)
            io.bind_ortvalue_input("past_key", present_k)
            io.bind_ortvalue_input("past_value", present_v)
            walls.append((time.perf_counter() - t0) * 1e3)
        return walls

    return loop


def _profiled_busy_ms(run: Callable[[], object]) -> tuple[float, int]:
    """GPU busy time (ms) while `run` runs, from CUPTI via torch.profiler; and the number of
    GPU intervals it saw (0: the profiler recorded nothing from ONNX Runtime)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        intervals = gpu_intervals(json.loads(path.read_text()))
    return busy_time(intervals) / 1e3, len(intervals)


def decoder_part(source: str, cuda: bool, steps: int, utterances: int, seed: int,
                 deadline: Deadline) -> dict[str, Any]:
    """Host overhead per decoder step on ORT CUDA (--cpu-smoke: the same loop on ORT CPU)."""
    import onnxruntime as ort

    from sfc.card import ModelCard
    from sfc.errors import SfcError
    from sfc.models import model_folder
    from sfc.runtime.session import open_session

    def skipped(reason: str) -> dict[str, Any]:
        print(f"decoder step: skipped: {reason}", flush=True)
        return {"status": "skipped", "reason": reason}

    if cuda and (why := ort_cuda_status()):
        return skipped(why)
    if not deadline.allows(DECODER_RESERVE_S / 2):
        return skipped(f"time guard ({deadline.left():.0f} s left)")
    provider = "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"
    try:
        if cuda and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA/cuDNN from torch or the nvidia-* wheels (ORT >= 1.21)
        folder = model_folder(source)
        card = ModelCard.load(folder)
        graph = card.graphs.get("decoder")
        if card.decoding is None or graph is None or not graph.path.endswith(".onnx"):
            return skipped(f"{folder} holds no Whisper decoder ONNX graph")
        sess = open_session(folder / graph.path, optimization=graph.optimization,
                            providers=list(dict.fromkeys([provider, "CPUExecutionProvider"])))
    except (SfcError, ImportError) as exc:  # no export, or a package the export needs
        return skipped(str(exc))
    if sess.get_providers()[0] != provider:
        return skipped(f"ONNX Runtime fell back to {sess.get_providers()[0]} (CUDA libraries "
                       "missing? see its log)")
    spec = card.decoding
    steps = min(steps, spec.max_target_positions - len(spec.prompt))
    cross = {t.name: concrete_shape(t.shape) for t in graph.inputs
             if t.name.startswith("cross_")}
    rng = np.random.default_rng(seed)
    device = "cuda" if cuda else "cpu"

    def utterance() -> Callable[[], list[float]]:
        return _decoder_utterance(sess, spec, cross, device, steps, rng)

    utterance()()  # warm-up: allocator, cuBLAS/cuDNN handles, kernel selection
    result: dict[str, Any] = {"model": card.name, "folder": str(folder), "provider": provider,
                              "steps": steps, "utterances": utterances,
                              "kv_cache": "device-resident (IO binding)",
                              "logits_bytes_per_step": spec.vocab_size * 4}
    walls = [w for _ in range(utterances) for w in utterance()()]
    if not cuda:
        print(f"decoder step: ran {len(walls)} steps on ORT CPU (smoke: not timed)", flush=True)
        return {**result, "status": "ran"}
    busy, seen = _profiled_busy_ms(utterance())  # profiles the steps, not the binding
    result.update(host_overhead(walls, busy if seen else None, steps))
    result.update(status="measured", gpu_time_method="CUPTI kernel/memcpy/memset intervals "
                  "(torch.profiler), one extra utterance", gpu_intervals=seen)
    if not seen:
        result["gpu_time_note"] = "the profiler recorded no GPU activity from ONNX Runtime"
    print(f"decoder step: wall {result['wall_ms_mean']:.3f} ms, GPU busy "
          f"{_fmt(result['gpu_busy_ms_per_step'], '.3f')} ms per step", flush=True)
    return result


def describe_device(cuda: bool) -> dict[str, Any]:
    """Name, capability, versions and HBM peak of the device (smoke: a CPU label)."""
    import onnxruntime as ort

    if not cuda:
        return {"gpu": False, "name": "CPU (Triton interpreter, ONNX Runtime CPU)",
                "onnxruntime": ort.__version__, "hbm_peak": None}
    from gpu_kernels import device_info

    info = {**device_info(), "gpu": True, "onnxruntime": ort.__version__}
    board_file = Path("/proc/device-tree/model")  # Jetson: which Orin module
    board = board_file.read_text(errors="replace").strip("\x00\n ") if board_file.is_file() else ""
    peak = hbm_peak(info["name"], board)
    info.update(board=board or None, hbm_peak=None if peak is None else asdict(peak),
                **nvml_versions())
    return info


def nvml_versions() -> dict[str, str | None]:
    """Driver and driver-CUDA versions from NVML (None without nvidia-ml-py)."""
    try:
        import pynvml
    except ImportError:
        return {"driver": None, "driver_cuda": None, "nvml_note": "nvidia-ml-py not installed"}
    try:
        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        cuda = int(pynvml.nvmlSystemGetCudaDriverVersion())
    except pynvml.NVMLError as exc:
        return {"driver": None, "driver_cuda": None, "nvml_note": f"NVML unavailable: {exc}"}
    return {"driver": driver.decode() if isinstance(driver, bytes) else str(driver),
            "driver_cuda": f"{cuda // 1000}.{cuda % 1000 // 10}"}


def memory_part() -> dict[str, Any]:
    """torch's peak allocation, and the device's used memory as NVML reports it."""
    import torch

    mem: dict[str, Any] = {"torch_max_allocated_bytes": torch.cuda.max_memory_allocated(),
                           "device_total_bytes": torch.cuda.get_device_properties(0).total_memory}
    try:
        mem["nvml_used_bytes"] = torch.cuda.device_memory_used()
        mem["nvml_note"] = "whole device, all processes, ONNX Runtime's arena included"
    except Exception as exc:  # no nvidia-ml-py (ImportError) or an NVMLError: say which
        mem["nvml_used_bytes"] = None
        mem["nvml_note"] = f"NVML unavailable: {exc}"
    return mem


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help=f"result JSON (default {DEFAULT_OUT.relative_to(REPO)}; "
                             f"--cpu-smoke: {SMOKE_OUT})")
    parser.add_argument("--quick", action="store_true",
                        help="fc1 layers only, fewer repeats and decoder steps")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S,
                        help="time guard: no new shape or part starts past it")
    parser.add_argument("--decoder", default="whisper-tiny.en",
                        help="zoo name or export folder whose decoder.onnx is stepped")
    parser.add_argument("--block-size", type=int, default=32,
                        help="W4A16/W2A16 quantization block along K (sfc's default 32)")
    parser.add_argument("--seed", type=int, default=None, help="inputs' seed (default: fresh)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="the whole flow on tiny shapes on the CPU; no timings, no GPU")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        # Before triton is first imported: triton.jit picks the interpreter at decoration.
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        import torch
    except ImportError:
        print("gpu_check: torch is not installed; nothing measured", file=sys.stderr)
        return 2
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); nothing "
              "measured (--cpu-smoke checks the script on the CPU)", file=sys.stderr)
        return 2
    import_sfc()
    from sfc.atomic import write_json_atomic

    cuda = not args.cpu_smoke
    out = args.out or (DEFAULT_OUT if cuda else SMOKE_OUT)
    seed = args.seed if args.seed is not None else int(np.random.default_rng().integers(2**63))
    deadline = Deadline(args.budget_s)
    mode = "cpu-smoke" if args.cpu_smoke else "quick" if args.quick else "full"
    ms = SMOKE_MS if args.cpu_smoke else (DECODE_M, PREFILL_M)
    repeats = 30 if args.quick else 100
    report: dict[str, Any] = {
        "mode": mode, "command": shlex.join(["python", *sys.argv]), "seed": seed,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": args.budget_s,
        "decode_prefill_m": ms,
        "device": describe_device(cuda)}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    print(f"device: {device_line(report['device'])}\nseed: {seed}", flush=True)

    def save(part: dict[str, Any] | None = None) -> None:
        if part is not None:
            report["kernels"] = part
        report["elapsed_s"] = deadline.elapsed()
        write_json_atomic(out, report)

    save()
    peak = report["device"]["hbm_peak"]
    decoder_wanted = not cuda or ort_cuda_status() is None
    reserve = DECODER_RESERVE_S if decoder_wanted else FINISH_RESERVE_S
    shapes = check_shapes(SMOKE_MODELS if args.cpu_smoke else MODELS, ms, args.quick)
    timers: tuple[Timer, Timer] = ((CudaTimer(5, repeats, graph=True),
                                    CudaTimer(5, repeats, graph=False)) if cuda
                                   else (no_timer, no_timer))
    kernels = kernel_part(shapes, seed, args.block_size, timers, cuda,
                          None if peak is None else peak["gbps"], deadline, reserve, save)
    kernels["repeats"] = repeats if cuda else 0
    save(kernels)
    report["decoder"] = decoder_part(args.decoder, cuda, 16 if args.cpu_smoke or args.quick
                                     else 48, 1 if args.quick or args.cpu_smoke else 3, seed,
                                     deadline)
    report["memory"] = memory_part() if cuda else None
    save()
    report["table_md"] = render_report(report)
    save()
    print("\n" + report["table_md"] + "\n")
    failures = sum(not c["ok"] for c in kernels["correctness"])
    if failures:
        print(f"KERNEL CORRECTNESS FAILED: {failures} check(s); see {out}", flush=True)
    print(f"wrote {out} ({deadline.elapsed():.0f} s elapsed)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
