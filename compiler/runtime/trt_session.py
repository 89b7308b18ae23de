"""Run a TensorRT engine (`model.plan`) behind ONNX Runtime's `session.run` interface.

So `sfc transcribe` / `sfc eval` / `sfc bench` run a TensorRT build folder through the same
Whisper runtime as an ORT one. TensorRT + pycuda (the design card's packages). Not run on
sfc's development machines (no TensorRT there): written against the documented API
(`execute_async_v3` with named tensor addresses) and type-checked with tensorrt-stubs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SfcError

__all__ = ["TrtSession", "open_engine"]


class TrtSession:
    """One engine and execution context; `run(None, feeds)` returns outputs in engine order.

    Output shapes are read from the context after the input shapes are set, so dynamic
    dimensions (decoder cache length) work; buffers are allocated per call (simple and
    correct; a serving loop would keep them).
    """

    def __init__(self, path: Path) -> None:
        import pycuda.autoinit  # noqa: F401  (creates the CUDA context)
        import tensorrt as trt

        self._trt = trt
        logger = trt.Logger(trt.Logger.WARNING)
        plan = Path(path).read_bytes()
        engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
        if engine is None:
            raise SfcError(f"TensorRT cannot load {path}: built by another TensorRT version "
                           "or for another GPU? Rebuild it on this device with sfc build "
                           "--from-qdq")
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names
                       if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names
                        if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def run(self, output_names: Sequence[str] | None,
            feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Copy `feeds` in, execute on a fresh stream, copy the outputs back."""
        import pycuda.driver as cuda

        trt, engine, ctx = self._trt, self.engine, self.context
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise SfcError(f"missing engine input(s): {', '.join(missing)}")
        stream = cuda.Stream()
        keep: list[Any] = []  # host arrays and device buffers must outlive the async copies
        for name in self.inputs:
            dtype = trt.nptype(engine.get_tensor_dtype(name))
            host = np.ascontiguousarray(feeds[name], dtype=dtype)
            if not ctx.set_input_shape(name, list(host.shape)):
                raise SfcError(f"input {name} shape {host.shape} is outside the engine's "
                               "optimisation profile")
            device = cuda.mem_alloc(max(1, host.nbytes))
            cuda.memcpy_htod_async(device, host, stream)
            ctx.set_tensor_address(name, int(device))
            keep += [host, device]
        results: dict[str, tuple[np.ndarray, Any]] = {}
        for name in self.outputs:
            dims = ctx.get_tensor_shape(name)
            shape = tuple(int(dims[i]) for i in range(len(dims)))
            host = np.empty(shape, dtype=trt.nptype(engine.get_tensor_dtype(name)))
            device = cuda.mem_alloc(max(1, host.nbytes))
            ctx.set_tensor_address(name, int(device))
            results[name] = (host, device)
        if not ctx.execute_async_v3(stream.handle):
            raise SfcError("TensorRT execution failed (see its log)")
        for host, device in results.values():
            cuda.memcpy_dtoh_async(host, device, stream)
        stream.synchronize()
        wanted = list(output_names) if output_names else self.outputs
        return [results[n][0] for n in wanted]


def open_engine(path: Path) -> TrtSession:
    """Open a `.plan`; one-line errors when it is missing or TensorRT/pycuda are absent."""
    from ..targets.tensorrt import tensorrt_available

    path = Path(path)
    if not path.is_file():
        raise SfcError(f"TensorRT engine not found: {path} (a build on a machine without "
                       "TensorRT leaves it to the device: see the build's report.md)")
    if not tensorrt_available():
        raise SfcError(f"{path} is a TensorRT engine and TensorRT is not installed here")
    try:
        import pycuda.driver  # noqa: F401
    except ImportError:
        raise SfcError("running TensorRT engines needs pycuda: pip install pycuda") from None
    return TrtSession(path)
