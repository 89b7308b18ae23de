"""Deployment targets: lower a QDQ ONNX model to the artifact a runtime loads.

`get_target("ort-cpu")` returns a target; each target declares its capabilities by name
(`caps_name`) and lowers with `target.lower(qdq_path, out_dir)`.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import SfcError
from .base import FusionCensus, LoweringResult, Target, artifact_bytes, fusion_census
from .ort_cpu import OrtCpuTarget
from .sim import SimTarget
from .tensorrt import TensorRTTarget
from .tensorrt_plan import TrtVersion

__all__ = [
    "FusionCensus",
    "LoweringResult",
    "OrtCpuTarget",
    "SimTarget",
    "Target",
    "TensorRTTarget",
    "artifact_bytes",
    "available_targets",
    "fusion_census",
    "get_target",
]

_TARGETS: dict[str, Callable[[], Target]] = {"ort-cpu": OrtCpuTarget, "sim": SimTarget,
                                              "tensorrt": TensorRTTarget}


def available_targets() -> tuple[str, ...]:
    """Names `get_target` accepts."""
    return tuple(sorted(_TARGETS))


def get_target(name: str) -> Target:
    """The target registered as `name`; `tensorrt:10.3` picks the TensorRT version.

    Raises:
        SfcError: unknown name, a bad version, or a version on a target that takes none.
    """
    base, _, version = name.partition(":")
    base = base.strip().lower()
    if base == "tensorrt":
        return TensorRTTarget(version=TrtVersion.parse(version) if version.strip() else None)
    if version:
        raise SfcError(f"target {base!r} takes no version (got {name!r})")
    if base in _TARGETS:
        return _TARGETS[base]()
    listing = ", ".join(available_targets())
    raise SfcError(f"unknown target {name!r}; available: {listing} (tensorrt takes a version: "
                   "tensorrt:10.3, tensorrt:10.16, tensorrt:11)")
