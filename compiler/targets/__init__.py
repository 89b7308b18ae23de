"""Deployment targets: lower a QDQ ONNX model to the artifact a runtime loads.

`get_target("ort-cpu")` returns a target; each target declares its capabilities by name
(`caps_name`) and lowers with `target.lower(qdq_path, out_dir)`. A suffix after ":" picks
the TensorRT version (`tensorrt:10.3`) or the CPU class (`ort-cpu:avx2`, default: this
machine's).
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
    "canonical_target",
    "fusion_census",
    "get_target",
]

_TARGETS: dict[str, Callable[[], Target]] = {"ort-cpu": OrtCpuTarget, "sim": SimTarget,
                                              "tensorrt": TensorRTTarget}


def available_targets() -> tuple[str, ...]:
    """Names `get_target` accepts."""
    return tuple(sorted(_TARGETS))


def get_target(name: str) -> Target:
    """The target registered as `name`; `tensorrt:10.3` picks the TensorRT version,
    `ort-cpu:avx2` the CPU class.

    Raises:
        SfcError: unknown name, a bad version or CPU class, or a suffix on a target that
        takes none.
    """
    base, _, version = name.partition(":")
    base, version = base.strip().lower(), version.strip().lower()
    if base == "tensorrt":
        return TensorRTTarget(version=TrtVersion.parse(version) if version else None)
    if base == "ort-cpu":
        return OrtCpuTarget(isa=version) if version else OrtCpuTarget()
    if version:
        raise SfcError(f"target {base!r} takes no version (got {name!r})")
    if base in _TARGETS:
        return _TARGETS[base]()
    listing = ", ".join(available_targets())
    raise SfcError(f"unknown target {name!r}; available: {listing} (tensorrt takes a version: "
                   "tensorrt:10.3, tensorrt:10.16, tensorrt:11; ort-cpu a CPU class: "
                   "ort-cpu:vnni, ort-cpu:avx2, ort-cpu:arm64)")


def canonical_target(name: str) -> str:
    """`name` with what it leaves to this machine made explicit (`ort-cpu` becomes
    `ort-cpu:avx2` on a CPU without VNNI), so a recipe says what it was built for."""
    target = get_target(name)
    return target.name if isinstance(target, OrtCpuTarget) else name.strip()
