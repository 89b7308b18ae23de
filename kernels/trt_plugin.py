"""sfc's TensorRT plugin for INT2 weight layers: `sfc::W2A16MatMul`, AOT Triton kernel.

TensorRT has no INT2 type; `sfc.targets.trt_rewrites` turns each INT2 block-weight MatMul
into a `W2A16MatMul` node: fp32 activations in and out (rounded to fp16 inside the
kernel), packed uint8 weights, fp32 block scales, attributes K, N, block_size and
`plugin_namespace="sfc"`. This module registers the matching quickly deployable plugin
(`tensorrt.plugin`, TensorRT >= 10.9 for AOT): the shape rule, the one type/format
combination, and an ahead-of-time implementation whose PTX is
`kernels.triton_gemm.lowbit_a16_kernel` compiled by `kernels.aot.compile_lowbit` for the
build machine's GPU. An AOT plugin needs no Python when the engine runs (trtexec, C++).

Not run here: TensorRT cannot be installed on sfc's development machines. The shape rule
(`output_shape`) and the launch (`launch_args`, `scalar_values`) are plain Python over a
`tensorrt.plugin` namespace passed in, tested with a stand-in that follows the documented
QDP API (TensorRT's `python/packaging/bindings_wheel/tensorrt/plugin/_tensor.py`,
`_top_level.py`, `_validate.py`, and `samples/python/quickly_deployable_plugins`): a
`ShapeExpr` is one dimension and a shape is `ShapeExprs`; `cdiv` refuses two ints; extra
kernel arguments are `SymInt32`s in a `SymIntExprs`. tensorrt-stubs has no
`tensorrt.plugin` module, so mypy sees that module as untyped (Any).

No `from __future__ import annotations` here: `tensorrt.plugin` validates the decorated
functions' annotations with `issubclass`, which string annotations would fail.
"""

import os
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import SfcError
from .aot import AotKernel, compile_lowbit

__all__ = ["PLUGIN", "launch_args", "output_shape", "register_plugins", "scalar_values"]

PLUGIN = "sfc::W2A16MatMul"
_registered = False


def scalar_values(names: Sequence[str], m: Any, n: int, k: int) -> list[Any]:
    """The kernel's scalar arguments, in launch order, for contiguous row-major tensors:
    x [M, K] fp16, scales [ceil(K/block), N], y [M, N]. `m` may be a symbolic expression."""
    values: dict[str, Any] = {"M": m, "N": n, "K": k, "stride_xm": k, "stride_xk": 1,
                              "stride_sk": n, "stride_sn": 1, "stride_ym": n, "stride_yn": 1}
    missing = [name for name in names if name not in values]
    if missing:
        raise SfcError(f"the W2A16 kernel takes scalar(s) sfc does not know: {missing}")
    return [values[name] for name in names]


def output_shape(x_dims: Any, n: int, trtp: Any) -> Any:
    """The plugin output's shape: x's leading dimensions, then N (x [..., K] -> y [..., N]).

    `x_dims`: x's `ShapeExprs` (indexable, with a length); the result is a
    `trtp.ShapeExprs` built from the leading `ShapeExpr`s and the constant N.
    """
    if len(x_dims) < 2:
        raise SfcError(f"{PLUGIN} needs an input of rank >= 2, not {len(x_dims)}")
    leading = [x_dims[i] for i in range(len(x_dims) - 1)]
    return trtp.ShapeExprs.from_tuple((*leading, n))


def launch_args(kernel: AotKernel, x_dims: Any, n: int, k: int,
                trtp: Any) -> tuple[Any, Any]:
    """`(KernelLaunchParams, SymIntExprs)` for x [..., K] @ W [K, N] with `kernel`.

    M (rows of x seen as [M, K]) is symbolic, so grid_x is `trtp.cdiv(M, BLOCK_M)`; N and
    BLOCK_N are both build-time ints, which `trtp.cdiv` refuses, so grid_y is plain
    ceiling division.
    """
    m = x_dims.numel() // k
    params = trtp.KernelLaunchParams()
    params.grid_x = trtp.cdiv(m, kernel.block_m)
    params.grid_y = -(-n // kernel.block_n)
    params.block_x = kernel.threads_per_block
    params.shared_mem = kernel.shared_mem_bytes
    extra = trtp.SymIntExprs.from_tuple(
        [trtp.SymInt32(v) for v in scalar_values(kernel.scalar_args, m, n, k)])
    return params, extra


def _cuda_arch() -> int:
    """Compute capability of GPU 0 as an int (87 for Orin); SFC_CUDA_ARCH overrides."""
    if os.environ.get("SFC_CUDA_ARCH"):
        return int(os.environ["SFC_CUDA_ARCH"])
    import pycuda.autoinit  # noqa: F401
    import pycuda.driver as cuda

    major, minor = cuda.Device(0).compute_capability()
    return int(major) * 10 + int(minor)


def _compile(block_size: int, aligned: bool) -> AotKernel:
    arch = _cuda_arch()
    # PTX 8.5: what JetPack 6's CUDA 12.6 driver can JIT (Triton defaults to newer).
    return compile_lowbit(2, block_size, arch=arch, activation_dtype="float32",
                          aligned=aligned, ptx_version=85 if arch <= 90 else None)


def register_plugins(compile_kernel: Callable[[int, bool], AotKernel] = _compile) -> None:
    """Register `sfc::W2A16MatMul` with TensorRT's plugin registry (once per process).

    `compile_kernel(block_size, aligned)`: the AOT kernel for a weight block size, with
    whole-byte weight loads when `aligned` (N a multiple of 4) (tests pass a stand-in; the
    default compiles with Triton for this machine's GPU).
    """
    global _registered
    if _registered:
        return
    import tensorrt.plugin as trtp

    # Signatures follow tensorrt.plugin's schemas: register (tensors, attributes) ->
    # TensorDesc; autotune (tensors, outputs); aot_impl (tensors, attributes, outputs,
    # tactic) -> (kernel name, PTX, KernelLaunchParams, SymExprs).
    @trtp.register(PLUGIN)
    def _desc(x: trtp.TensorDesc, packed: trtp.TensorDesc, scales: trtp.TensorDesc, K: int,
              N: int, block_size: int) -> trtp.TensorDesc:
        out = x.like()
        out.shape_expr = output_shape(x.shape_expr, N, trtp)
        return out

    @trtp.autotune(PLUGIN)
    def _formats(x: trtp.TensorDesc, packed: trtp.TensorDesc, scales: trtp.TensorDesc,
                 outputs: tuple[trtp.TensorDesc]) -> list[trtp.AutoTuneCombination]:
        # inputs x, packed, scales, then the output: the kernel's only combination.
        return [trtp.AutoTuneCombination("FP32, UINT8, FP32, FP32", "LINEAR")]

    @trtp.aot_impl(PLUGIN)
    def _aot(x: trtp.TensorDesc, packed: trtp.TensorDesc, scales: trtp.TensorDesc, K: int,
             N: int, block_size: int, outputs: tuple[trtp.TensorDesc],
             tactic: int) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams,
                                   trtp.SymExprs]:
        kernel = compile_kernel(block_size, N % 4 == 0)  # 4 INT2 fields per byte
        params, extra = launch_args(kernel, x.shape_expr, N, K, trtp)
        return kernel.name, kernel.ptx, params, extra

    _registered = True
