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

__all__ = [
    "FusionCensus",
    "LoweringResult",
    "OrtCpuTarget",
    "SimTarget",
    "Target",
    "artifact_bytes",
    "available_targets",
    "fusion_census",
    "get_target",
]

_TARGETS: dict[str, Callable[[], Target]] = {"ort-cpu": OrtCpuTarget, "sim": SimTarget}
# Named so that asking for them explains itself instead of reading as a typo.
_PLANNED: dict[str, str] = {"tensorrt": "strongly typed TensorRT engines"}


def available_targets() -> tuple[str, ...]:
    """Names `get_target` accepts."""
    return tuple(sorted(_TARGETS))


def get_target(name: str) -> Target:
    """The target registered as `name`; a version suffix (`tensorrt:10.3`) is ignored here.

    Raises:
        SfcError: `name` is planned but not implemented, or unknown.
    """
    base = name.split(":", 1)[0].strip().lower()
    if base in _TARGETS:
        return _TARGETS[base]()
    listing = ", ".join(available_targets())
    if base in _PLANNED:
        raise SfcError(f"target {base!r} is not available yet ({_PLANNED[base]}, planned); "
                       f"available: {listing}")
    planned = ", ".join(f"{p} (not available yet)" for p in sorted(_PLANNED))
    raise SfcError(f"unknown target {name!r}; available: {listing}; {planned}")
