"""What the benchmark worker needs from a CUDA GPU: event timing and NVML readings.

Timing: CUDA events recorded before and after each call, read on the GPU's clock, from
pycuda (the engine runner's own package) or, where only it is installed, a CUDA build of
torch. The calls sfc times (ORT's CUDA provider, the TensorRT engine runner) copy their
outputs back to the host before they return, so the events bracket the whole call, host
overhead included, which is what a user waits for.

NVML (`nvidia-ml-py`, module `pynvml`): GPU name, driver, memory used/total, this process's
GPU memory, SM and memory clocks. Both are optional packages; every function takes the
module as a parameter so tests pass fakes, and every failure is a one-line SfcError that
names what is missing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

from ..errors import SfcError

__all__ = ["EventTimer", "GpuSnapshot", "event_timer", "nvml_reader", "visible_gpu"]

_T = TypeVar("_T")
_MIB = 1024 * 1024


class EventTimer:
    """Times one call with a pair of CUDA events; `make_event()` returns a fresh event.

    `elapsed(start, end)` reads the milliseconds between two synchronised events (pycuda
    and torch spell it differently).
    """

    def __init__(self, backend: str, make_event: Callable[[], Any],
                 elapsed: Callable[[Any, Any], float]) -> None:
        self.backend = backend
        self._make_event = make_event
        self._elapsed = elapsed

    def __call__(self, fn: Callable[[], _T]) -> tuple[_T, float]:
        """Run `fn` once; return its result and its duration in milliseconds."""
        start, end = self._make_event(), self._make_event()
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return out, float(self._elapsed(start, end))


def _pycuda_timer(driver: ModuleType) -> EventTimer:
    return EventTimer("pycuda", driver.Event, lambda s, e: s.time_till(e))


def _torch_timer(torch: ModuleType) -> EventTimer:
    return EventTimer("torch", lambda: torch.cuda.Event(enable_timing=True),
                      lambda s, e: s.elapsed_time(e))


def _installed_pycuda() -> ModuleType | None:
    """pycuda's driver module with a context on the first GPU, or None when not installed."""
    try:
        import pycuda.driver as driver
    except ImportError:
        return None
    try:
        import pycuda.autoinit  # noqa: F401  (the context the TensorRT engine runner shares)
    except Exception as exc:  # pycuda.driver.Error: no device, driver too old, ...
        raise SfcError(f"pycuda cannot start CUDA: {str(exc).strip() or exc!r}") from None
    return driver


def _installed_torch() -> ModuleType | None:
    try:
        import torch
    except ImportError:
        return None
    return torch


def event_timer(*, pycuda_driver: ModuleType | None = None,
                torch: ModuleType | None = None) -> EventTimer:
    """A CUDA-event timer from pycuda, else from a CUDA build of torch (the modules default
    to the installed ones); SfcError when neither can time on a GPU."""
    driver = pycuda_driver if pycuda_driver is not None else _installed_pycuda()
    if driver is not None:
        return _pycuda_timer(driver)
    torch = torch if torch is not None else _installed_torch()
    if torch is not None and torch.cuda.is_available():
        return _torch_timer(torch)
    raise SfcError("CUDA-event timing needs pycuda (pip install pycuda) or a CUDA build of "
                   "torch; neither can reach a GPU here")


@dataclass(frozen=True)
class GpuSnapshot:
    """One NVML reading of the benchmark's GPU (memory in MiB, clocks in MHz).

    `process_memory_mib` is this process's share where NVML lists it (not in containers
    whose PIDs NVML cannot see, nor on Jetson/WSL); `memory_used_mib` is device-wide.
    """

    name: str
    driver: str
    memory_total_mib: float
    memory_used_mib: float
    process_memory_mib: float | None
    sm_clock_mhz: int
    mem_clock_mhz: int
    sm_clock_max_mhz: int
    mem_clock_max_mhz: int


def visible_gpu(environ: Mapping[str, str]) -> int | str:
    """The NVML index or UUID of the GPU CUDA calls device 0.

    CUDA numbers only the GPUs in CUDA_VISIBLE_DEVICES, NVML numbers all of them: the first
    entry there is the GPU both sfc's runner and ORT use (an index, or a "GPU-..." UUID).
    NVML orders by PCI bus, CUDA fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID, so on a
    mixed multi-GPU machine set that, or CUDA_VISIBLE_DEVICES, for the reading to match.
    """
    first = environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    if not first:
        return 0
    if first.isdigit():
        return int(first)
    return first


def _nvml_error(nvml: ModuleType, exc: Exception) -> SfcError:
    """NVML's failure as a line that says what is missing."""
    text = str(exc).strip() or type(exc).__name__
    if type(exc).__name__ in ("NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded"):
        return SfcError(f"no NVIDIA GPU driver here (NVML: {text})")
    return SfcError(f"NVML cannot read the GPU: {text}")


def nvml_reader(*, nvml: ModuleType | None = None,
                environ: Mapping[str, str] | None = None) -> Callable[[], GpuSnapshot]:
    """Start NVML and return a function that reads the benchmark's GPU; SfcError naming
    what is missing (nvidia-ml-py, the driver, the GPU) when it cannot."""
    if nvml is None:
        try:
            import pynvml as nvml_module
        except ImportError:
            raise SfcError("GPU memory and clocks come from NVML: pip install nvidia-ml-py"
                           ) from None
        nvml = nvml_module
    which = visible_gpu(os.environ if environ is None else environ)
    try:
        nvml.nvmlInit()
        handle = (nvml.nvmlDeviceGetHandleByIndex(which) if isinstance(which, int)
                  else nvml.nvmlDeviceGetHandleByUUID(which))
        name, driver = nvml.nvmlDeviceGetName(handle), nvml.nvmlSystemGetDriverVersion()
        sm_max = int(nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_SM))
        mem_max = int(nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_MEM))
    except nvml.NVMLError as exc:
        raise _nvml_error(nvml, exc) from None
    pid = os.getpid()

    def read() -> GpuSnapshot:
        assert nvml is not None
        try:
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            sm = int(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM))
            memclk = int(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM))
        except nvml.NVMLError as exc:
            raise _nvml_error(nvml, exc) from None
        mine = [p.usedGpuMemory for p in procs if p.pid == pid and p.usedGpuMemory is not None]
        return GpuSnapshot(
            name=name if isinstance(name, str) else name.decode(),  # bytes before 11.5
            driver=driver if isinstance(driver, str) else driver.decode(),
            memory_total_mib=mem.total / _MIB, memory_used_mib=mem.used / _MIB,
            process_memory_mib=sum(mine) / _MIB if mine else None,
            sm_clock_mhz=sm, mem_clock_mhz=memclk,
            sm_clock_max_mhz=sm_max, mem_clock_max_mhz=mem_max,
        )

    return read
