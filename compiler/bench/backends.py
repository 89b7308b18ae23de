"""How the benchmark worker runs and measures on each kind of device.

A device kind ("cpu", "cuda", "jetson") decides four things, all here: which ONNX Runtime
execution providers run .onnx graphs, whether TensorRT engines may run, how one call is
timed (wall clock, or CUDA events), and what else is read (NVML on a GPU; tegrastats on a
Jetson). The worker resolves its kind on the machine it runs on, so a remote device gets
the same measurements by running the same worker there.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ..errors import SfcError
from .cuda import GpuSnapshot, event_timer, nvml_reader
from .tegrastats import TegrastatsSampler

__all__ = [
    "CPU_PROVIDERS",
    "CUDA_PROVIDERS",
    "KINDS",
    "Backend",
    "Timer",
    "check_providers",
    "check_runs_on",
    "engine_graphs",
    "open_backend",
    "runs_engines",
    "wall_timer",
]

KINDS = ("cpu", "cuda", "jetson")
CPU_PROVIDERS = ("CPUExecutionProvider",)
# ORT places the nodes CUDA cannot run on the CPU provider listed after it.
CUDA_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")

_T = TypeVar("_T")


class Timer(Protocol):
    """Runs a call once and returns its result and its duration in milliseconds."""

    def __call__(self, fn: Callable[[], _T]) -> tuple[_T, float]:
        """Time one call of `fn`."""
        ...


def wall_timer(fn: Callable[[], _T]) -> tuple[_T, float]:
    """The host's monotonic high-resolution clock."""
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1000.0


def runs_engines(kind: str) -> bool:
    """Whether workers of this kind may run TensorRT engines (only on a GPU)."""
    return kind in ("cuda", "jetson")


def engine_graphs(path: Path) -> tuple[str, ...]:
    """The TensorRT engines (card paths ending in .plan) of an sfc folder; () otherwise."""
    path = Path(path)
    if not path.is_dir():
        return ()
    from ..card import ModelCard

    return tuple(g.path for g in ModelCard.load(path).graphs.values()
                 if g.path.endswith(".plan"))


def check_runs_on(path: Path, kind: str) -> None:
    """Refuse an engine folder on a device that has no GPU: TensorRT would run it on the
    GPU anyway, and the report would call GPU timings CPU ones."""
    engines = engine_graphs(path)
    if engines and not runs_engines(kind):
        raise SfcError(f"{path} holds TensorRT engines ({', '.join(engines)}), which run only "
                       f"on a GPU: bench it with --device cuda or --device jetson, not {kind}")


def check_providers(requested: Sequence[str], session: Any) -> None:
    """Fail when ORT did not start the first requested provider.

    ORT falls back to the CPU with only a logged error when the CUDA provider cannot load
    (no cuDNN, a CUDA mismatch); timing that under a GPU label would be wrong.
    """
    got = session.get_providers()
    if requested and (not got or got[0] != requested[0]):
        raise SfcError(f"ONNX Runtime did not start {requested[0]} (running on "
                       f"{', '.join(got) or 'nothing'}); see its log on stderr for the "
                       "missing CUDA/cuDNN library")


def _available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def _no_gpu() -> GpuSnapshot | None:
    return None


def _no_sampler() -> TegrastatsSampler | None:
    return None


@dataclass(frozen=True)
class Backend:
    """What a worker of one kind runs with; see the module docstring."""

    kind: str
    providers: tuple[str, ...]
    timer: Timer
    timing: str  # how `timer` measures, for the report: "wall clock", "CUDA events (pycuda)"
    gpu: Callable[[], GpuSnapshot | None] = _no_gpu
    sampler: Callable[[], TegrastatsSampler | None] = _no_sampler

    def onnx_providers(self) -> tuple[str, ...]:
        """The providers for .onnx graphs; SfcError when ORT here lacks the first one."""
        have = _available_providers()
        if self.providers[0] not in have:
            raise SfcError(f"ONNX Runtime here has no {self.providers[0]} (it has "
                           f"{', '.join(have)}): pip install onnxruntime-gpu, or bench a "
                           "TensorRT build folder")
        return self.providers


def open_backend(kind: str) -> Backend:
    """The backend of `kind` on this machine; a one-line SfcError naming what is missing
    (NVML and a GPU for cuda; tegrastats for jetson; a CUDA-event timer for both)."""
    if kind == "cpu":
        return Backend("cpu", CPU_PROVIDERS, wall_timer, "wall clock")
    if kind not in KINDS:
        raise SfcError(f"unknown device kind {kind!r} (expected {', '.join(KINDS)})")
    gpu: Callable[[], GpuSnapshot | None]
    sampler: Callable[[], TegrastatsSampler | None]
    if kind == "cuda":
        try:
            gpu = nvml_reader()
        except SfcError as exc:
            raise SfcError(f"--device cuda needs an NVIDIA GPU: {exc}") from None
        sampler = _no_sampler
    else:
        if shutil.which("tegrastats") is None:
            raise SfcError("--device jetson needs tegrastats (L4T's /usr/bin/tegrastats): "
                           "this is no Jetson, or it is not on PATH")
        try:
            gpu = nvml_reader()  # Thor has NVML; Orin and Xavier do not
        except SfcError:
            gpu = _no_gpu
        sampler = TegrastatsSampler  # every DEFAULT_INTERVAL_MS
    try:
        timer = event_timer()
    except SfcError as exc:
        raise SfcError(f"--device {kind}: {exc}") from None
    return Backend(kind, CUDA_PROVIDERS, timer, f"CUDA events ({timer.backend})", gpu, sampler)
