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
from .errors import SfcError
from .models import zoo_export_cached
from .models.zoo import ZOO, locate_checkpoint
from .paths import BUNDLED_DATA, cache_dir

__all__ = ["MachineInfo", "ZooModel", "machine_info"]


@dataclass(frozen=True)
class ZooModel:
    """Where a zoo model is on this machine."""

    checkpoint: tuple[str, ...]  # folders of its installed checkpoint files; () if missing
    exported: bool  # its FP32 export is in the cache (else made on first use)


@dataclass(frozen=True)
class MachineInfo:
    """Runtimes, accelerators and CPU features found on this machine, and where sfc's
    data, cache and models are."""

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
    data: str  # the bundled calibration and evaluation sets (sfc.paths.BUNDLED_DATA)
    cache: str  # zoo exports, probes, search checkpoints ($SFC_CACHE)
    zoo: dict[str, ZooModel]

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


def _zoo_model(name: str) -> ZooModel:
    try:
        files = locate_checkpoint(name)
    except SfcError:  # its package is missing or incomplete
        folders: tuple[str, ...] = ()
    else:
        folders = tuple(dict.fromkeys(str(f.parent) for f in files.model_bin))
    return ZooModel(checkpoint=folders, exported=zoo_export_cached(name))


def machine_info() -> MachineInfo:
    """Collect what is installed without initialising CUDA, TensorRT or torch."""
    import onnxruntime

    cpu, flags = cpu_info()
    packages = {d: _version(d) for d in ("onnxruntime", "onnx", "torch", "transformers",
                                         "pycuda", "polygraphy", "triton",
                                         "ctranslate2")}
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
        data=str(BUNDLED_DATA),
        cache=str(cache_dir()),
        zoo={name: _zoo_model(name) for name in ZOO},
    )
