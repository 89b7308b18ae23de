"""Benchmarks: latency percentiles, throughput, RTF, peak memory and size of artifacts.

`bench([...], baseline=fp32)` runs every variant in its own worker process on a device
(`cpu` now; `cuda` and `jetson` planned), interleaved over rounds, and returns a
`BenchReport` that saves to and loads from JSON; `render(report)` makes a rich table.
"""

from .devices import CpuDevice, Device, available_devices, get_device
from .results import BenchReport, LatencyStats, VariantResult, WorkerResult, render
from .runner import artifact_size, bench, default_clips

__all__ = [
    "BenchReport",
    "CpuDevice",
    "Device",
    "LatencyStats",
    "VariantResult",
    "WorkerResult",
    "artifact_size",
    "available_devices",
    "bench",
    "default_clips",
    "get_device",
    "render",
]
