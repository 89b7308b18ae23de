"""sfc's TensorRT plugin for INT2 weight layers: `sfc::W2A16MatMul`, AOT Triton kernel.

TensorRT has no INT2 type; `sfc.targets.trt_rewrites` turns each INT2 block-weight MatMul
into a `W2A16MatMul` node: fp32 activations in and out (rounded to fp16 inside the
kernel), packed uint8 weights, fp32 block scales, attributes K, N, block_size and
`plugin_namespace="sfc"`. This module registers the matching quickly deployable plugin
(`tensorrt.plugin`, TensorRT >= 10.9 for AOT): the shape rule, the one type/format
combination, and an ahead-of-time implementation whose PTX is
`kernels.triton_gemm.lowbit_a16_kernel` compiled by `kernels.aot.compile_lowbit` for the
build machine's GPU. An AOT plugin needs no Python when the engine runs (trtexec, C++).

Not run here: TensorRT cannot be installed on sfc's development machines. The launch
arguments (`scalar_values`) are plain Python and tested against the compiled kernel's
parameter list; the rest follows TensorRT's documented QDP API. tensorrt-stubs has no
`tensorrt.plugin` module, so mypy sees that module as untyped (Any).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..errors import SfcError

__all__ = ["PLUGIN", "register_plugins", "scalar_values"]

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


def _cuda_arch() -> int:
    """Compute capability of GPU 0 as an int (87 for Orin); SFC_CUDA_ARCH overrides."""
    if os.environ.get("SFC_CUDA_ARCH"):
        return int(os.environ["SFC_CUDA_ARCH"])
    import pycuda.autoinit  # noqa: F401
    import pycuda.driver as cuda

    major, minor = cuda.Device(0).compute_capability()
    return int(major) * 10 + int(minor)


def register_plugins() -> None:
    """Register `sfc::W2A16MatMul` with TensorRT's plugin registry (once per process)."""
    global _registered
    if _registered:
        return
    import tensorrt.plugin as trtp

    from .aot import compile_lowbit

    @trtp.register(PLUGIN)
    def _desc(x: trtp.TensorDesc, packed: trtp.TensorDesc, scales: trtp.TensorDesc, K: int,
              N: int, block_size: int) -> trtp.TensorDesc:
        out = x.like()
        out.shape_expr = trtp.ShapeExpr(
            [x.shape_expr[i] for i in range(len(x.shape_expr) - 1)] + [N])
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
        arch = _cuda_arch()
        # PTX 8.5: what JetPack 6's CUDA 12.6 driver can JIT (Triton defaults to newer).
        kernel = compile_lowbit(2, block_size, arch=arch, activation_dtype="float32",
                                ptx_version=85 if arch <= 90 else None)
        m = x.shape_expr.numel() // K
        params = trtp.KernelLaunchParams()
        params.grid_x = trtp.cdiv(m, kernel.block_m)
        params.grid_y = trtp.cdiv(N, kernel.block_n)
        params.block_x = kernel.threads_per_block
        params.shared_mem = kernel.shared_mem_bytes
        values = scalar_values(kernel.scalar_args, m, N, K)
        extra = trtp.SymIntExprs(len(values))
        for i, value in enumerate(values):
            extra[i] = trtp.SymInt32(value)
        return kernel.name, kernel.ptx, params, extra

    _registered = True
