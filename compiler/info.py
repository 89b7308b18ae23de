"""`sfc info`: what this machine can run (no heavy imports: nothing is initialised)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
from dataclasses import asdict, dataclass
from typing import Any

from .cpu import cpu_info, isa_of
from .models.zoo import ZOO

__all__ = ["MachineInfo", "machine_info"]

@dataclass(frozen=True)
class MachineInfo:
    """Runtimes, accelerators and CPU features found on this machine."""

    python: str
    platform: str
    cpu: str
    cores: int
    cpu_flags: tuple[str, ...]
    ort_cpu_class: str  # what `--target ort-cpu` builds for on this machine
    packages: dict[str, str | None]
    onnxruntime_providers: tuple[str, ...]
    tensorrt: str | None
    cuda_gpu: str | None
    zoo: dict[str, bool]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gpu() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    import subprocess

    try:
        done = subprocess.run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().replace("\n", "; ") or None


def machine_info() -> MachineInfo:
    """Collect what is installed without initialising CUDA, TensorRT or torch."""
    import onnxruntime

    cpu, flags = cpu_info()
    packages = {d: _version(d) for d in ("onnxruntime", "onnx", "torch", "transformers",
                                         "pycuda", "polygraphy", "triton",
                                         "ctranslate2")}
    zoo = {name: all(importlib.util.find_spec(m) is not None for m in e.modules)
           for name, e in ZOO.items()}
    return MachineInfo(
        python=platform.python_version(),
        platform=platform.platform(),
        cpu=cpu,
        cores=os.cpu_count() or 1,
        cpu_flags=flags,
        ort_cpu_class=isa_of(platform.machine(), flags),
        packages=packages,
        onnxruntime_providers=tuple(onnxruntime.get_available_providers()),
        tensorrt=_version("tensorrt") if importlib.util.find_spec("tensorrt") else None,
        cuda_gpu=_gpu(),
        zoo=zoo,
    )
