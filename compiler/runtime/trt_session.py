"""Run a TensorRT engine (`model.plan`): ORT's `session.run` interface, and a resident loop.

So `sfc transcribe` / `sfc eval` / `sfc bench` run a TensorRT build folder through the same
Whisper runtime as an ORT one. Device memory for every engine input and output is
allocated once, at the engine's optimisation-profile maximum; `run` copies its feeds in and
the asked-for outputs back. `TrtSession.loop` serves repeated runs whose state stays on the
device (the Whisper decoder's steps): inputs fixed for the loop (cross-attention K/V) are
copied once, each carried output (present K/V) is written into the buffer the next run
reads as its input (past K/V), tensor addresses are bound when the loop starts, and only
the fetched outputs (logits) come back.

Memory operations go through `DeviceMemory` (alloc / htod / dtoh / free): `CudaMemory`
(pycuda) on a GPU, a counting stand-in in tests. TensorRT + pycuda are the design card's
packages. Not run on sfc's development machines (no TensorRT there): written against the
documented API (`execute_async_v3` with named tensor addresses, `get_tensor_profile_shape`)
and type-checked with tensorrt-stubs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import SfcError

__all__ = ["CudaMemory", "DeviceMemory", "ResidentLoop", "TensorIO", "TrtSession",
           "engine_io", "open_engine"]


class DeviceMemory(Protocol):
    """The device memory operations the runner uses (addresses are ints, as TensorRT's)."""

    @property
    def stream(self) -> int:
        """Handle of the CUDA stream engines run on."""
        ...

    def alloc(self, nbytes: int) -> int:
        """A new device buffer of at least max(1, `nbytes`) bytes: its address."""
        ...

    def htod(self, dst: int, src: np.ndarray) -> None:
        """Copy contiguous `src` to the start of buffer `dst`, ordered before later runs."""
        ...

    def dtoh(self, dst: np.ndarray, src: int) -> None:
        """Copy `dst.nbytes` from buffer `src` into `dst` once the stream's work is done;
        returns when `dst` holds the data."""
        ...

    def free(self, ptr: int) -> None:
        """Release a buffer from `alloc`."""
        ...


class CudaMemory:
    """`DeviceMemory` with pycuda on GPU 0.

    Copies are synchronous (`memcpy_htod` / `memcpy_dtoh`), which is correct for ordinary
    pageable numpy arrays (the async copies need page-locked memory); `dtoh` first waits
    for the engine's stream. Per decoder step only the token ids go in and the logits come
    out, so asynchrony would buy little.
    """

    def __init__(self) -> None:
        import pycuda.autoinit  # noqa: F401  (creates the CUDA context)
        import pycuda.driver as cuda

        self._cuda = cuda
        self._stream = cuda.Stream()
        self._buffers: dict[int, Any] = {}  # address -> pycuda DeviceAllocation

    @property
    def stream(self) -> int:
        """Handle of this memory's CUDA stream."""
        return int(self._stream.handle)

    def alloc(self, nbytes: int) -> int:
        """`cuda.mem_alloc`, kept alive until `free`."""
        buf = self._cuda.mem_alloc(max(1, nbytes))
        self._buffers[int(buf)] = buf
        return int(buf)

    def htod(self, dst: int, src: np.ndarray) -> None:
        """Synchronous host-to-device copy."""
        self._cuda.memcpy_htod(self._buffers[dst], src)

    def dtoh(self, dst: np.ndarray, src: int) -> None:
        """Wait for the stream, then copy device-to-host."""
        self._stream.synchronize()
        self._cuda.memcpy_dtoh(dst, self._buffers[src])

    def free(self, ptr: int) -> None:
        """Release a buffer."""
        self._buffers.pop(ptr).free()


@dataclass(frozen=True)
class TensorIO:
    """One engine input or output and the largest shape it takes under the profile."""

    name: str
    is_input: bool
    dtype: np.dtype[Any]
    max_shape: tuple[int, ...]

    @property
    def max_bytes(self) -> int:
        """Bytes of the largest tensor."""
        return math.prod(self.max_shape) * self.dtype.itemsize


def _dims(dims: Any) -> tuple[int, ...]:
    return tuple(int(dims[i]) for i in range(len(dims)))


def engine_io(engine: Any, context: Any, trt: Any) -> tuple[TensorIO, ...]:
    """Every IO tensor of `engine` with its largest shape, in engine order.

    Inputs: the maximum of optimisation profile 0. Outputs: their shape with every input
    at its maximum, read from `context`; sfc's graphs only grow their outputs with their
    inputs (batch, tokens, cache length), so that is each output's largest.
    `trt`: the `tensorrt` module (its `TensorIOMode` and `nptype`).
    """
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
    largest: dict[str, tuple[int, ...]] = {}
    for name in names:
        if name in inputs:
            largest[name] = _dims(engine.get_tensor_profile_shape(name, 0)[2])
            if not context.set_input_shape(name, largest[name]):
                raise SfcError(f"TensorRT refuses the profile maximum {largest[name]} of "
                               f"input {name}")
    for name in names:
        if name not in inputs:
            largest[name] = _dims(context.get_tensor_shape(name))
            if min(largest[name], default=0) < 0:
                raise SfcError(f"engine output {name} has a data-dependent shape "
                               f"{largest[name]}; sfc's runner needs shapes known from "
                               "the inputs")
    return tuple(TensorIO(n, n in inputs, np.dtype(trt.nptype(engine.get_tensor_dtype(n))),
                          largest[n]) for n in names)


class TrtSession:
    """One engine and execution context with device buffers for its profile's maximum.

    `run(output_names, feeds)` is ONNX Runtime's interface; `loop` keeps state on the
    device between runs. The session owns one buffer per tensor, so one loop (or run) at
    a time uses it: starting a loop takes the buffers over from the previous one.
    """

    def __init__(self, engine: Any, context: Any, io: Sequence[TensorIO],
                 memory: DeviceMemory) -> None:
        self.engine = engine
        self.context = context
        self.memory = memory
        self.io = {t.name: t for t in io}
        self.inputs = [t.name for t in io if t.is_input]
        self.outputs = [t.name for t in io if not t.is_input]
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (address, bytes)
        self._owner: ResidentLoop | None = None  # the loop whose bindings are current
        for t in io:
            self._buffer(t.name, t.max_bytes)

    def profile_max(self, name: str) -> tuple[int, ...]:
        """The largest shape input `name` accepts (the engine's optimisation profile)."""
        if name not in self.inputs:
            raise SfcError(f"the engine has no input {name!r} (inputs: "
                           f"{', '.join(self.inputs)})")
        return self.io[name].max_shape

    def _buffer(self, name: str, nbytes: int) -> int:
        """The device buffer of `name`, (re)allocated to hold at least `nbytes`."""
        address, size = self._buffers.get(name, (0, -1))
        if size < nbytes:
            if size >= 0:
                self.memory.free(address)
            address = self.memory.alloc(nbytes)
            self._buffers[name] = (address, nbytes)
        return address

    def _bind(self, name: str, address: int) -> None:
        if not self.context.set_tensor_address(name, address):
            raise SfcError(f"TensorRT refused the address of tensor {name}")

    def _set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self.context.set_input_shape(name, shape):
            raise SfcError(f"input {name} shape {shape} is outside the engine's "
                           f"optimisation profile (largest {self.io[name].max_shape})")

    def _load(self, name: str, value: np.ndarray, address: int) -> None:
        """Copy an input's host value into its buffer at `address` and set its shape."""
        if name not in self.inputs:
            raise SfcError(f"the engine has no input {name!r}")
        host = np.ascontiguousarray(value, dtype=self.io[name].dtype)
        self._set_shape(name, host.shape)
        self.memory.htod(address, host)

    def _fetch(self, name: str, address: int) -> np.ndarray:
        """Copy an output back, at the shape the current input shapes give it."""
        out = self.io[name]
        host = np.empty(_dims(self.context.get_tensor_shape(name)), dtype=out.dtype)
        self.memory.dtoh(host, address)
        return host

    def _execute(self) -> None:
        for name in self.outputs:  # engine_io's "largest at the largest inputs", checked
            out = self.io[name]
            nbytes = math.prod(_dims(self.context.get_tensor_shape(name))) * out.dtype.itemsize
            if nbytes > self._buffers[name][1]:
                raise SfcError(f"engine output {name} needs {nbytes} bytes, more than at "
                               "the profile's largest inputs")
        if not self.context.execute_async_v3(self.memory.stream):
            raise SfcError("TensorRT execution failed (see its log)")

    def run(self, output_names: Sequence[str] | None,
            feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Copy every feed in, execute, copy the asked-for outputs (all: None) back."""
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise SfcError(f"missing engine input(s): {', '.join(missing)}")
        self._owner = None
        for name in self.io:
            self._bind(name, self._buffers[name][0])
        for name in self.inputs:
            self._load(name, feeds[name], self._buffers[name][0])
        self._execute()
        wanted = list(output_names) if output_names else self.outputs
        return [self._fetch(n, self._buffers[n][0]) for n in wanted]

    def loop(self, constants: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray],
             carry: Mapping[str, str]) -> ResidentLoop:
        """Start repeated runs that keep `constants` and the carried state on the device.

        `constants`: inputs copied once, for every run of the loop. `state`: the first
        values of the carried inputs. `carry`: output name -> the input it becomes on the
        next run (present_key -> past_key). Inputs in neither are fed on each run.
        """
        for out, inp in carry.items():
            if out not in self.outputs or inp not in state:
                raise SfcError(f"cannot carry {out!r} into {inp!r}: it needs an engine "
                               "output and an input with a first state")
        return ResidentLoop(self, constants, state, carry)


class ResidentLoop:
    """Runs of one `TrtSession` whose carried outputs stay on the device as next inputs.

    A carried pair (output -> input) uses the session's buffers of both tensors, each
    sized for the larger of the two maxima: a run reads the input from one and writes the
    output into the other, then the two swap roles (a rebinding, no copy). One buffer
    cannot serve both: the cache's layout changes with its length, so writing present K/V
    over past K/V would overwrite rows not yet read.
    """

    def __init__(self, session: TrtSession, constants: Mapping[str, np.ndarray],
                 state: Mapping[str, np.ndarray], carry: Mapping[str, str]) -> None:
        self._session = s = session
        s._owner = self
        self._carry = dict(carry)
        for out, inp in carry.items():  # both buffers of a pair hold either tensor
            size = max(s.io[out].max_bytes, s.io[inp].max_bytes)
            s._buffer(inp, size)
            s._buffer(out, size)
        self._address = {name: s._buffers[name][0] for name in s.io}
        for name, address in self._address.items():  # carried pairs swap on each run
            s._bind(name, address)
        for name, value in {**constants, **state}.items():
            s._load(name, value, self._address[name])
        self._shapes = {name: tuple(np.shape(value)) for name, value in state.items()}
        self._fed = [n for n in s.inputs if n not in constants and n not in state]

    def run(self, feeds: Mapping[str, np.ndarray], fetch: Sequence[str]) -> list[np.ndarray]:
        """One run: copy `feeds` in, execute, carry the state, copy `fetch` back."""
        s = self._session
        if s._owner is not self:
            raise SfcError("this engine session ran something else since the loop started")
        missing = [n for n in self._fed if n not in feeds]
        if missing:
            raise SfcError(f"missing engine input(s): {', '.join(missing)}")
        for name in self._fed:
            s._load(name, feeds[name], self._address[name])
        for inp, shape in self._shapes.items():
            s._set_shape(inp, shape)
        s._execute()
        fetched = [s._fetch(n, self._address[n]) for n in fetch]
        for out, inp in self._carry.items():
            self._shapes[inp] = _dims(s.context.get_tensor_shape(out))
            # the output just written is the next run's input, and the other way round
            self._address[inp], self._address[out] = self._address[out], self._address[inp]
            s._bind(inp, self._address[inp])
            s._bind(out, self._address[out])
        return fetched


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
    import tensorrt as trt

    memory = CudaMemory()  # the CUDA context must exist before the engine is loaded
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise SfcError(f"TensorRT cannot load {path}: built by another TensorRT version "
                       "or for another GPU? Rebuild it on this device with sfc build "
                       "--from-qdq")
    context = engine.create_execution_context()
    return TrtSession(engine, context, engine_io(engine, context, trt), memory)
