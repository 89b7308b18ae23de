"""Benchmarks: latency percentiles, throughput, RTF, peak memory and size of artifacts.

`bench([...], baseline=fp32, device="cpu" | "cuda" | "jetson" | a Device)` runs every
variant in its own worker process on a device, interleaved over rounds, and returns a
`BenchReport` that saves to and loads from JSON; `render(report)` makes a rich table. On a
GPU the worker times with CUDA events and reads NVML; on a Jetson it also samples
tegrastats. `load_trtexec(log)` reads a trtexec performance summary.
"""

from .devices import Device, LocalDevice, available_devices, describe_device, get_device
from .results import (
    BenchReport,
    DeviceStats,
    LatencyStats,
    VariantResult,
    WorkerResult,
    render,
)
from .runner import artifact_size, bench, default_clips
from .trtexec import TrtexecSummary, load_trtexec, parse_trtexec, render_trtexec

__all__ = [
    "BenchReport",
    "Device",
    "DeviceStats",
    "LatencyStats",
    "LocalDevice",
    "TrtexecSummary",
    "VariantResult",
    "WorkerResult",
    "artifact_size",
    "available_devices",
    "bench",
    "default_clips",
    "describe_device",
    "get_device",
    "load_trtexec",
    "parse_trtexec",
    "render",
    "render_trtexec",
]
