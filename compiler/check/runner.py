"""`check_model`: load a QDQ ONNX file and run every rule against one target's profile."""

from __future__ import annotations

from pathlib import Path

import onnx

from ..errors import SfcError, first_line
from ..models.onnx_source import require_utf8
from .findings import CheckReport
from .graph import GraphView
from .profiles import format_arch, resolve_profile
from .rules import RULES

__all__ = ["check_model", "load_for_check"]


def load_for_check(path: str | Path) -> onnx.ModelProto:
    """Read `path` without its external data (rules read the few tensors they need).

    A missing or unparsable file is a one-line SfcError.
    """
    p = Path(path)
    if not p.is_file():
        raise SfcError(f"ONNX file not found: {p}")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends: a user error
        raise SfcError(f"{p} is not a valid ONNX model: {first_line(exc)}") from None
    if not model.HasField("graph") or not model.opset_import:
        raise SfcError(f"{p} is not a valid ONNX model: no graph or no opset_import")
    require_utf8(model, p)
    return model


def check_model(path_or_model: str | Path | onnx.ModelProto, target: str, *,
                arch: str | None = None) -> CheckReport:
    """Check a QDQ ONNX model statically against what `target` accepts.

    `target`: 'tensorrt:10.3', 'tensorrt:10.16', 'tensorrt:11' or 'ort-cpu' ('tensorrt'
    alone: the version `sfc build --target tensorrt` builds for). `arch` overrides the
    profile's compute capability ('sm_90'). Nothing is built or run; the model is not
    changed. Raises SfcError for an unknown target or arch, and a missing or corrupt file.
    """
    profile = resolve_profile(target, arch)  # a bad target fails before any loading
    if isinstance(path_or_model, onnx.ModelProto):
        model, base_dir, label = path_or_model, None, path_or_model.graph.name or "model"
    else:
        model = load_for_check(path_or_model)
        base_dir, label = Path(path_or_model).parent, str(path_or_model)
    view = GraphView.of(model, base_dir)
    findings = tuple(f for rule in RULES for f in rule.check(view, profile))
    return CheckReport(model=label, target=profile.name, arch=format_arch(profile.arch),
                       findings=findings)
