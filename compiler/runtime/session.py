"""ONNX Runtime sessions for sfc's graphs (no torch)."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from ..errors import SfcError

__all__ = ["open_session"]


def open_session(path: Path, *, threads: int | None = None,
                 providers: list[str] | None = None) -> ort.InferenceSession:
    """Open `path` in ONNX Runtime; a file ORT cannot load is a one-line user error."""
    path = Path(path)
    if not path.is_file():
        raise SfcError(f"model file not found: {path}")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), sess_options=options,
                                    providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own opaque classes; keep their first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SfcError(f"ONNX Runtime cannot load {path}: {first}") from None
