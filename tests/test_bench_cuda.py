"""`--device cuda` and `--device jetson` without a GPU: CUDA-event timers on fake pycuda /
torch modules, NVML on a fake module, the worker on fake backends (ORT's CPU provider
standing in for CUDA), engine folders refused on the CPU, and the one-line errors this
GPU-less machine gives for real."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper

from sfc.bench import BenchReport, bench, render
from sfc.bench import cuda as cuda_mod
from sfc.bench.backends import (
    CPU_PROVIDERS,
    CUDA_PROVIDERS,
    Backend,
    check_providers,
    open_backend,
    wall_timer,
)
from sfc.bench.cuda import GpuSnapshot, event_timer, nvml_reader, visible_gpu
from sfc.bench.results import BenchReport as Report
from sfc.bench.results import WorkerArgs, WorkerResult, summarize_variant
from sfc.bench.tegrastats import TegrastatsSampler
from sfc.bench.worker import describe, run
from sfc.card import GraphSpec, ModelCard, TensorSpec
from sfc.errors import SfcError

TEGRA = Path(__file__).parent / "fixtures" / "tegrastats" / "orin_nano_jp6_idle.txt"
REPLAY = ("import sys, time\n"
          "line = open(sys.argv[1]).read().strip()\n"
          "for _ in range(500):\n"
          "    print(line, flush=True)\n"
          "    time.sleep(0.02)\n")
GPU_HERE = shutil.which("nvidia-smi") is not None


@pytest.fixture(scope="module")
def relu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path = tmp_path_factory.mktemp("cuda") / "relu.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture
def engine_folder(tmp_path: Path) -> Path:
    """A generic TensorRT build folder: card.json pointing at model/model.plan."""
    x = TensorSpec("x", "float32", ("batch", 8))
    card = ModelCard(name="relu", family="generic", objective="distortion",
                     graphs={"model": GraphSpec(path="model/model.plan", inputs=(x,),
                                                outputs=(TensorSpec("y", "float32",
                                                                    ("batch", 8)),))})
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.plan").write_bytes(b"not an engine")
    card.save(tmp_path)
    return tmp_path


# --- CUDA events -----------------------------------------------------------------------------

class _Event:
    """Records what happened to it in a shared log; `time_till` / `elapsed_time` give 2.5."""

    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def record(self) -> None:
        self.log.append(f"record {self.name}")

    def synchronize(self) -> None:
        self.log.append(f"sync {self.name}")

    def time_till(self, other: _Event) -> float:
        self.log.append(f"{self.name} till {other.name}")
        return 2.5

    def elapsed_time(self, other: _Event) -> float:
        return self.time_till(other)


def _events(log: list[str]) -> Any:
    names = iter("se")
    return lambda *a, **k: _Event(log, next(names))


def test_pycuda_event_timer_brackets_the_call() -> None:
    log: list[str] = []
    timer = event_timer(pycuda_driver=SimpleNamespace(Event=_events(log)))

    def call() -> int:
        log.append("call")
        return 42

    out, ms = timer(call)
    assert (out, ms, timer.backend) == (42, 2.5, "pycuda")
    assert log == ["record s", "call", "record e", "sync e", "s till e"]


def test_torch_event_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    log: list[str] = []
    made: list[dict[str, Any]] = []
    events = _events(log)

    def event(**kwargs: Any) -> _Event:
        made.append(kwargs)
        return events()

    torch = SimpleNamespace(cuda=SimpleNamespace(Event=event, is_available=lambda: True))
    monkeypatch.setattr(cuda_mod, "_installed_pycuda", lambda: None)
    timer = event_timer(torch=torch)
    assert timer(lambda: "x") == ("x", 2.5) and timer.backend == "torch"
    assert made == [{"enable_timing": True}] * 2  # timing events, not bare sync events
    no_gpu = SimpleNamespace(cuda=SimpleNamespace(is_available=lambda: False))
    with pytest.raises(SfcError, match=r"needs pycuda \(pip install pycuda\) or a CUDA build"):
        event_timer(torch=no_gpu)


# --- NVML -----------------------------------------------------------------------------------

class _NVMLError(Exception):
    pass


class NVMLError_LibraryNotFound(_NVMLError):  # pynvml's own class name
    pass


def _fake_nvml(asked: list[object], fail: Exception | None = None) -> Any:
    mib = 1024 * 1024

    def handle(which: object) -> str:
        if fail is not None:
            raise fail
        asked.append(which)
        return "h"

    return SimpleNamespace(
        NVMLError=_NVMLError, NVML_CLOCK_SM=0, NVML_CLOCK_MEM=1,
        nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=handle,
        nvmlDeviceGetHandleByUUID=handle,
        nvmlDeviceGetName=lambda h: b"NVIDIA H200", nvmlSystemGetDriverVersion=lambda: "570.1",
        nvmlDeviceGetMaxClockInfo=lambda h, c: (1980, 3201)[c],
        nvmlDeviceGetClockInfo=lambda h, c: (1755, 3201)[c],
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=141 * 1024 * mib,
                                                          used=2048 * mib),
        nvmlDeviceGetComputeRunningProcesses=lambda h: [
            SimpleNamespace(pid=os.getpid(), usedGpuMemory=600 * mib),
            SimpleNamespace(pid=-1, usedGpuMemory=900 * mib)],
    )


def test_nvml_reading_of_the_visible_gpu() -> None:
    asked: list[object] = []
    read = nvml_reader(nvml=_fake_nvml(asked), environ={"CUDA_VISIBLE_DEVICES": "2,3"})
    snap = read()
    assert asked == [2]  # CUDA's device 0 is NVML's GPU 2
    assert snap == GpuSnapshot(name="NVIDIA H200", driver="570.1", memory_total_mib=141 * 1024,
                               memory_used_mib=2048, process_memory_mib=600, sm_clock_mhz=1755,
                               mem_clock_mhz=3201, sm_clock_max_mhz=1980,
                               mem_clock_max_mhz=3201)
    assert visible_gpu({"CUDA_VISIBLE_DEVICES": "GPU-5a1b"}) == "GPU-5a1b"
    assert visible_gpu({}) == 0


def test_nvml_failures_say_what_is_missing() -> None:
    lost = _fake_nvml([], NVMLError_LibraryNotFound("NVML Shared Library Not Found"))
    with pytest.raises(SfcError, match=r"^no NVIDIA GPU driver here \(NVML: NVML Shared "):
        nvml_reader(nvml=lost, environ={})
    with pytest.raises(SfcError, match=r"^NVML cannot read the GPU: GPU is lost$"):
        nvml_reader(nvml=_fake_nvml([], _NVMLError("GPU is lost")), environ={})


@pytest.mark.skipif(GPU_HERE, reason="this machine has an NVIDIA GPU")
@pytest.mark.parametrize(("kind", "missing"), [
    ("cuda", r"^--device cuda needs an NVIDIA GPU: .*(nvidia-ml-py|driver)"),
    ("jetson", r"^--device jetson needs tegrastats"),
])
def test_no_gpu_here_is_one_line(relu: Path, kind: str, missing: str) -> None:
    """The real backend and the real worker process on this GPU-less machine."""
    with pytest.raises(SfcError, match=missing) as err:
        open_backend(kind)
    assert "\n" not in str(err.value)
    with pytest.raises(SfcError, match=missing):
        bench([relu], device=kind, rounds=1, runs=1, warmup=0, progress=False)


# --- the worker on fake backends -------------------------------------------------------------

SNAP = GpuSnapshot(name="Fake GPU", driver="1.0", memory_total_mib=8192, memory_used_mib=1000,
                   process_memory_mib=None, sm_clock_mhz=1500, mem_clock_mhz=5000,
                   sm_clock_max_mhz=1800, mem_clock_max_mhz=5000)


def _fake_timer(fn: Any) -> tuple[Any, float]:
    return fn(), 7.25


def _cuda_stand_in(**kw: Any) -> Backend:
    """A cuda backend whose "GPU" is ORT's CPU provider, timed at a constant 7.25 ms."""
    return Backend("cuda", CPU_PROVIDERS, _fake_timer, "fake events", gpu=lambda: SNAP, **kw)


def test_worker_times_with_the_backend_timer(relu: Path) -> None:
    out = run(WorkerArgs(artifact=str(relu), runs=4, warmup=1, device="cuda"),
              backend=_cuda_stand_in())
    result = WorkerResult.from_dict(out)
    assert result.latency_ms == (7.25,) * 4  # the event timer's, not the wall clock's
    assert result.gpu == SNAP and result.tegrastats is None
    info = describe("cuda", _cuda_stand_in())
    assert info["timing"] == "fake events" and info["gpu"]["name"] == "Fake GPU"
    assert "jetson" not in info


def test_engine_folders_need_a_gpu(relu: Path, engine_folder: Path) -> None:
    with pytest.raises(SfcError, match=r"holds TensorRT engines \(model/model.plan\), which "
                                       r"run only on a GPU: bench it with --device cuda"):
        bench([engine_folder], device="cpu", rounds=1, progress=False)
    with pytest.raises(SfcError, match="TensorRT engines"):
        run(WorkerArgs(artifact=str(engine_folder), device="cpu"))
    # On a GPU backend the engine goes to the engine runner (no TensorRT or no real engine).
    with pytest.raises(SfcError, match=r"model\.plan is a TensorRT engine and TensorRT is not "
                                       r"installed|TensorRT cannot load|needs pycuda"):
        run(WorkerArgs(artifact=str(engine_folder), device="cuda"), backend=_cuda_stand_in())
    with pytest.raises(SfcError, match="through its build folder"):
        bench([engine_folder / "model" / "model.plan"], device="cuda", progress=False)


def test_cuda_provider_missing_or_not_started(relu: Path) -> None:
    """This ORT has no CUDA provider: a one-line error, not a CPU run under a GPU label;
    and a session whose CUDA provider fell back to the CPU is refused."""
    cuda = Backend("cuda", CUDA_PROVIDERS, _fake_timer, "fake events")
    with pytest.raises(SfcError, match=r"has no CUDAExecutionProvider .*onnxruntime-gpu"):
        run(WorkerArgs(artifact=str(relu), device="cuda"), backend=cuda)
    fell_back = SimpleNamespace(get_providers=lambda: ["CPUExecutionProvider"])
    with pytest.raises(SfcError, match="did not start CUDAExecutionProvider"):
        check_providers(CUDA_PROVIDERS, fell_back)
    check_providers(CUDA_PROVIDERS, SimpleNamespace(get_providers=lambda: list(CUDA_PROVIDERS)))


def test_jetson_worker_samples_tegrastats(relu: Path) -> None:
    """tegrastats (replayed from a real Orin line) around a real run: constant VDD_IN, so the
    mean power is exactly the reading and the energy is power x the measured window."""
    def sampler() -> TegrastatsSampler:
        return TegrastatsSampler(20, command=[sys.executable, "-c", REPLAY, str(TEGRA)])

    jetson = Backend("jetson", CPU_PROVIDERS, wall_timer, "fake events", sampler=sampler)
    result = WorkerResult.from_dict(
        run(WorkerArgs(artifact=str(relu), runs=200, warmup=1, device="jetson"), backend=jetson))
    t = result.tegrastats
    assert t is not None and t.samples >= 1 and t.items == 200
    assert (t.power_rail, t.power_mw) == ("VDD_IN", pytest.approx(5263))
    assert t.energy_mj == pytest.approx(5263 * t.window_s)
    assert t.energy_mj_per_item == pytest.approx(t.energy_mj / 200)
    assert (t.ram_used_mb, t.ram_total_mb) == (2639, 7620)


# --- summaries, JSON and the table -----------------------------------------------------------

def _round(ms: float, gpu: GpuSnapshot | None, energy: float | None) -> WorkerResult:
    from sfc.bench.tegrastats import TegraSummary

    tegra = None if energy is None else TegraSummary(
        samples=5, window_s=1.0, items=4, ram_used_mb=3000 + energy, ram_total_mb=7620,
        cpu_load_pct=20.0, gpu_load_pct=90.0, gpu_freq_mhz=612, emc_load_pct=40.0,
        emc_freq_mhz=2133, rails_mw={"VDD_IN": 8000.0}, power_rail="VDD_IN",
        power_mw=4 * energy, energy_mj=4 * energy, energy_mj_per_item=energy)
    return WorkerResult(artifact="a", kind="whisper", threads=None, load_s=0.1,
                        latency_ms=(ms,) * 3, peak_rss_kib=1000, decoder_step_ms=(5.0, 1.0),
                        audio_s=10.0, transcribe_s=1.0, gpu=gpu, tegrastats=tegra)


def test_device_stats_over_rounds_and_json_round_trip(tmp_path: Path) -> None:
    gpus = [replace(SNAP, process_memory_mib=m, sm_clock_mhz=c)
            for m, c in ((500.0, 1400), (700.0, 1600), (None, 1500))]
    rounds = [_round(10.0, g, e) for g, e in zip(gpus, (100.0, 300.0, 200.0), strict=True)]
    v = summarize_variant("engine", "a", 10, rounds)
    s = v.device_stats
    assert s is not None
    # Process memory where NVML listed the worker, else the device's use: max(500, 700, 1000).
    assert s.gpu_mem_mib == 1000 and s.sm_clock_mhz == 1500
    assert s.energy_mj == 200 and s.power_w == pytest.approx(0.8)  # medians: 200 mJ, 800 mW
    assert s.ram_used_mib == 3300  # the largest
    assert summarize_variant("cpu", "a", 10, [_round(10.0, None, None)]).device_stats is None

    report = Report(device="jetson", device_info={"cpu": "ARM", "cores": 6, "timing": "x",
                                                  "jetson": {"model": "Orin", "l4t": "36.4.0",
                                                             "power_mode": "MAXN"}},
                    threads=None, runs=3, warmup=1, rounds=3, clips=(), baseline=None,
                    variants=(v,))
    report.save(tmp_path / "r.json")
    assert BenchReport.load(tmp_path / "r.json") == report
    table = render(report)
    headers = [c.header for c in table.columns]
    assert {"GPU MiB", "SM MHz", "RAM MiB", "GR3D %", "W", "mJ/item"} <= set(headers)
    assert "Orin, L4T 36.4.0, power mode MAXN" in str(table.title)
    assert "VDD_IN" in str(table.caption) and "per utterance" in str(table.caption)
