"""ONNX Runtime sessions for sfc's graphs (no torch)."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from ..errors import SfcError

__all__ = ["OPTIMIZATION", "open_session"]

# Graph optimisation levels a model card may ask for. "basic" (constant folding, no QDQ
# fusion) keeps fake-quant graphs exact: onnxruntime 1.31's extended rewrites drop a Relu in
# front of an INT4 QuantizeLinear (tests/test_targets_sim.py).
OPTIMIZATION = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


def open_session(path: Path, *, threads: int | None = None,
                 providers: list[str] | None = None,
                 optimization: str = "all") -> ort.InferenceSession:
    """Open `path` in ONNX Runtime; a file ORT cannot load is a one-line user error.

    `optimization`: a key of `OPTIMIZATION` (the model card's choice for the graph).
    """
    path = Path(path)
    if not path.is_file():
        raise SfcError(f"model file not found: {path}")
    if optimization not in OPTIMIZATION:
        raise SfcError(f"unknown graph optimization level {optimization!r} "
                       f"(expected one of {', '.join(OPTIMIZATION)})")
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION[optimization]
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), sess_options=options,
                                    providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own opaque classes; keep their first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SfcError(f"ONNX Runtime cannot load {path}: {first}") from None
