"""sfc's plugin nodes as ONNX Runtime custom ops (onnxruntime-extensions Python ops).

The TensorRT-ready ONNX (`model.trt.onnx`) carries `W2A16MatMul` nodes in the
`ai.onnx.contrib` domain (`sfc.targets.trt_rewrites`); TensorRT runs them with the plugin of
`sfc.kernels.trt_plugin`, and ONNX Runtime runs them through this module with the numpy
reference (`sfc.kernels.reference.w2a16_gemm`), so the same file is testable on any CPU.
A Python op is slow (numpy, float64): it is for checking numerics, not for deployment.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import SfcError

__all__ = ["session_options"]

_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    try:
        from onnxruntime_extensions import PyCustomOpDef, onnx_op
    except ImportError:
        raise SfcError("running sfc plugin nodes in ONNX Runtime needs onnxruntime-extensions "
                       "(pip install onnxruntime-extensions)") from None
    from .reference import w2a16_gemm

    @onnx_op(op_type="W2A16MatMul",
             inputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_uint8, PyCustomOpDef.dt_float],
             outputs=[PyCustomOpDef.dt_float],
             attrs={"K": PyCustomOpDef.dt_int64, "N": PyCustomOpDef.dt_int64,
                    "block_size": PyCustomOpDef.dt_int64,
                    "plugin_namespace": PyCustomOpDef.dt_string,
                    "plugin_version": PyCustomOpDef.dt_string})
    def w2a16_matmul(x: np.ndarray, packed: np.ndarray, scales: np.ndarray,
                     **attrs: Any) -> np.ndarray:
        k, n, block = int(attrs["K"]), int(attrs["N"]), int(attrs["block_size"])
        # MatMul broadcasts leading dims; the kernel sees [M, K] and rounds x to fp16.
        flat = x.reshape(-1, k).astype(np.float16)
        y = w2a16_gemm(flat, packed, scales, k, n, block)
        return np.asarray(y, dtype=np.float32).reshape(*x.shape[:-1], n)

    _REGISTERED = True


def session_options() -> Any:
    """`onnxruntime.SessionOptions` that can run sfc's plugin nodes."""
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path

    _register()
    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    return options
