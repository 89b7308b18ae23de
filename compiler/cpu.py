"""The host CPU: its name, the instruction-set flags that decide which integer kernels ONNX
Runtime runs, and the ORT CPU instruction-set class sfc builds for by default."""

from __future__ import annotations

import platform
from pathlib import Path

__all__ = ["CPU_FLAGS", "VNNI_FLAGS", "cpu_info", "host_isa", "isa_of"]

# CPU flags that decide which quantized kernels are fast (INT8 dot products, AMX tiles).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8",
             "amx_bf16", "asimddp", "i8mm")
# Any of these gives ORT's u8 x s8 GEMMs an exact int32 dot product (vpdpbusd, AMX tiles).
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
_ARM = frozenset({"aarch64", "arm64"})


def cpu_info() -> tuple[str, tuple[str, ...]]:
    """(model name, the `CPU_FLAGS` this CPU has), from /proc/cpuinfo where there is one."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return platform.processor() or platform.machine(), ()
    name, flags = platform.machine(), set()
    for line in cpuinfo.read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and name == platform.machine():
            name = value.strip()
        elif key in ("flags", "Features"):
            flags.update(value.split())
    return name, tuple(f for f in CPU_FLAGS if f in flags)


def isa_of(machine: str, flags: tuple[str, ...] | frozenset[str]) -> str:
    """The ort-cpu class of a CPU: "arm64", "vnni" (x86 with an exact INT8 dot product) or
    "avx2" (any other x86, whose u8 x s8 kernels saturate in int16; unknown flags count as
    this, the safe side)."""
    if machine.lower() in _ARM:
        return "arm64"
    return "vnni" if VNNI_FLAGS & set(flags) else "avx2"


def host_isa() -> str:
    """`isa_of` this machine."""
    return isa_of(platform.machine(), cpu_info()[1])
