"""Ahead-of-time PTX for the W4A16 / W2A16 Triton kernels (what ``@trtp.aot_impl`` returns).

TensorRT's AOT Python plugins (``tensorrt.plugin.aot_impl``, TRT >= 10.9) return the kernel
name, its PTX, the launch parameters (grid, ``block_x`` threads, shared memory) and the
extra scalar arguments, which TensorRT passes after the tensor inputs and before the
outputs. ``compile_lowbit`` produces the first three for ``triton_gemm.lowbit_a16_kernel``,
whose parameters are already in that order, plus the names of the scalar arguments in order.

What works (checked on a CPU-only machine, triton 3.9): ``triton.compile`` with an explicit
``GPUTarget("cuda", arch, 32)`` needs no GPU and no CUDA driver; it lowers to PTX with its
bundled LLVM and assembles a cubin with its bundled ``ptxas``, which also validates the PTX
for that arch (sm_80, sm_87 Orin, sm_90a H100 tried). Tests check the PTX's ``.entry`` and
``.target``.

What is not verified here (no GPU, no TensorRT on these machines):
- that TensorRT launches this PTX correctly. Triton >= 3.3 appends two pointer parameters
  to every kernel (global and profile scratch); TensorRT passes only inputs, extra args
  and outputs. The kernels need no scratch (``global_scratch_size`` and
  ``profile_scratch_size`` are 0, reported in ``AotKernel``), so the extra parameters are
  never read, but a launch that supplies fewer parameters than the entry declares is
  outside what CUDA documents.
- running the PTX on a device. PTX ISA version: Triton defaults to what its bundled
  ptxas supports (8.8 in triton 3.9), newer than JetPack 6's CUDA 12.6 driver can JIT
  (PTX 8.5); pass ``ptx_version=85`` for Orin on JetPack 6.
Activations and output are fp16, or fp32 with the activations rounded to fp16 inside
the kernel (``activation_dtype``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import SfcError

__all__ = ["AotKernel", "compile_lowbit"]

# Triton signature types of float tensors' pointers, by dtype name.
_FLOAT_POINTERS = {"float16": "*fp16", "float32": "*fp32"}


@dataclass(frozen=True)
class AotKernel:
    """One compiled kernel and how to launch it."""

    name: str  # the PTX .entry name
    ptx: str
    arch: int  # compute capability, e.g. 87
    num_warps: int
    threads_per_block: int  # KernelLaunchParams.block_x
    shared_mem_bytes: int  # KernelLaunchParams.shared_mem (dynamic shared memory)
    block_m: int
    block_n: int
    scalar_args: tuple[str, ...]  # the extra args, in launch order (after the inputs)
    global_scratch_size: int
    profile_scratch_size: int

    def grid(self, m: int, n: int) -> tuple[int, int, int]:
        """(grid_x, grid_y, grid_z) for an [M, K] x [K, N] product."""
        return math.ceil(m / self.block_m), math.ceil(n / self.block_n), 1


def compile_lowbit(bits: int, block_size: int, *, arch: int = 87,
                   activation_dtype: str = "float16", scale_dtype: str = "float32",
                   tiles: tuple[int, int, int] | None = None, aligned: bool = False,
                   num_warps: int = 4,
                   ptx_version: int | None = None) -> AotKernel:
    """Compile the W`bits`A16 kernel (bits 4 or 2) for sm_`arch` to PTX, without a GPU.

    `block_size`: the weight's quantization block along K (power of two >= 16).
    `activation_dtype`: "float16" or "float32", the type of x and y (fp32 x is rounded to
    fp16 inside the kernel, as in ``triton_gemm``).
    `scale_dtype`: "float32" (what sfc's QDQ files hold) or "float16". `tiles`:
    (BLOCK_M, BLOCK_N, BLOCK_K), default ``triton_gemm.tiles_for(16, block_size)``
    (decode). K is not split (SPLIT_K = 1): a plugin launches one kernel into its output.
    `aligned`: N is a multiple of the fields per byte (whole-byte loads, several times
    faster); a kernel compiled with it must not be launched for another N.
    `ptx_version`: PTX ISA as an int (85 = 8.5), None for Triton's default (see module doc).
    Raises SfcError when triton is missing or the compilation fails.
    """
    if bits not in (2, 4):
        raise SfcError(f"AOT compilation covers the 4- and 2-bit kernels, not {bits}-bit")
    for what, dtype in (("activation_dtype", activation_dtype), ("scale_dtype", scale_dtype)):
        if dtype not in _FLOAT_POINTERS:
            raise SfcError(f"{what} must be float16 or float32, not {dtype!r}")
    if block_size < 16 or block_size & (block_size - 1):
        raise SfcError(f"block_size must be a power of two >= 16, not {block_size}")
    try:
        import triton
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        raise SfcError("AOT compilation needs triton (pip install triton)") from None
    if knobs.runtime.interpret:
        # triton.language's own helpers were built for the interpreter when triton was
        # imported, so this process cannot generate code (checked with triton 3.9).
        raise SfcError("AOT compilation cannot run with TRITON_INTERPRET=1; "
                       "run it in a process without it")
    from .triton_gemm import lowbit_a16_kernel, tiles_for

    block_m, block_n, block_k = tiles or tiles_for(16, block_size)
    if block_size % block_k:
        raise SfcError(f"BLOCK_K {block_k} must divide block_size {block_size}")
    constexprs = {"BITS": bits, "QBLOCK": block_size, "BLOCK_M": block_m,
                  "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": 1, "ALIGNED": aligned}
    act = _FLOAT_POINTERS[activation_dtype]
    types = {"x_ptr": act, "w_ptr": "*u8", "s_ptr": _FLOAT_POINTERS[scale_dtype], "y_ptr": act}
    signature = {}
    scalars = []
    for param in lowbit_a16_kernel.params:
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        elif param.name in types:
            signature[param.name] = types[param.name]
        else:
            signature[param.name] = "i32"
            scalars.append(param.name)
    options: dict[str, int] = {"num_warps": num_warps}
    if ptx_version is not None:
        options["ptx_version"] = ptx_version
    source = ASTSource(fn=lowbit_a16_kernel, signature=signature, constexprs=constexprs)
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as exc:  # LLVM / ptxas failures surface as assorted exception types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SfcError(f"Triton could not compile the W{bits}A16 kernel for sm_{arch}: "
                       f"{first}") from None
    meta = compiled.metadata
    ptx = compiled.asm["ptx"]
    if not re.search(rf"\.entry\s+{re.escape(meta.name)}\s*\(", ptx):
        raise SfcError(f"compiled PTX has no .entry {meta.name}")
    return AotKernel(
        name=meta.name, ptx=ptx, arch=arch, num_warps=meta.num_warps,
        threads_per_block=meta.num_warps * 32, shared_mem_bytes=meta.shared,
        block_m=block_m, block_n=block_n, scalar_args=tuple(scalars),
        global_scratch_size=meta.global_scratch_size,
        profile_scratch_size=meta.profile_scratch_size,
    )  # fmt: skip
