"""The `sim` target: the QDQ graph itself, run by ONNX Runtime as fake quantization.

Why: some bit-widths have no integer kernel on this CPU (4-bit activations; 4-bit weights
with quantized activations, i.e. W4A8), yet their accuracy must be measured before a
TensorRT or custom-kernel target runs them. ORT executes QuantizeLinear/DequantizeLinear of
INT8/INT4/INT2 exactly as the ONNX spec defines them and the float op in between, so the
QDQ file's own numerics are the reference. A `sim` build is an accuracy artifact, not a
speed one: where ORT happens to fuse an INT8 pattern at load, its fused kernel computes the
same quantized product (ORT's QDQ contract), and nothing else changes.

The artifact is the QDQ file (no copy when it already lies in `out_dir`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from ..atomic import staging_dir
from ..errors import SfcError
from .base import LoweringResult, artifact_bytes, external_data_files, fusion_census

__all__ = ["SimTarget"]

_NOTE = ("fake-quant: the QDQ graph as is (reference numerics for bit-widths without a CPU "
         "integer kernel); not a speed artifact")


@dataclass(frozen=True)
class SimTarget:
    """Fake-quantized evaluation of any QDQ model sfc writes (4-bit activations included)."""

    @property
    def name(self) -> str:
        """Registry name."""
        return "sim"

    @property
    def caps_name(self) -> str:
        """Name of the capabilities entry placement reads."""
        return "sim"

    @property
    def optimization(self) -> str:
        """no QDQ rewrites: the Q/DQ nodes are the numerics under test."""
        return "basic"

    def session_config(self, model: onnx.ModelProto) -> dict[str, str]:
        """No fusions: nothing to configure."""
        return {}

    def for_graph(self, card: Any, graph: str) -> SimTarget:
        """Nothing graph-specific: the same target."""
        return self

    def lower(self, qdq_path: Path, out_dir: Path, *, stem: str = "model") -> LoweringResult:
        """Check that ORT loads `qdq_path` and report it as the artifact.

        When `out_dir` is not the QDQ file's folder, the file (and its external data) is
        copied there as `<stem>.qdq.onnx`, atomically.
        """
        qdq_path, out_dir = Path(qdq_path), Path(out_dir)
        if not qdq_path.is_file():
            raise SfcError(f"QDQ model not found: {qdq_path}")
        try:
            external = external_data_files(qdq_path)
        except Exception as exc:  # protobuf DecodeError and friends
            raise SfcError(f"{qdq_path} is not an ONNX model: {exc}") from None
        artifact = qdq_path.name
        if qdq_path.parent.resolve() != out_dir.resolve():
            if external:
                raise SfcError(f"{qdq_path} keeps its weights in external data; "
                               "lower it inside its own folder")
            artifact = f"{stem}.qdq.onnx"
            with staging_dir(out_dir) as stage:
                shutil.copyfile(qdq_path, stage / artifact)
        from ..runtime.session import open_session

        # One-line SfcError if ORT cannot load it.
        open_session(out_dir / artifact, threads=1, optimization=self.optimization)
        census = fusion_census(onnx.load(str(out_dir / artifact), load_external_data=False))
        return LoweringResult.from_census(
            census, target=self.name, artifact=artifact, ort_format=None,
            bytes=artifact_bytes(out_dir / artifact), notes=(_NOTE,),
            optimization=self.optimization)
