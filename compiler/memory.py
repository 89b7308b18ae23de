"""This process's peak resident memory: what `sfc build` reports and `sfc bench` measures."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys
from pathlib import Path

__all__ = ["peak_rss_kib", "release_free_memory"]


def peak_rss_kib() -> int:
    """This process's peak resident set size in KiB.

    Linux: VmHWM from /proc/self/status, which starts afresh at exec; ru_maxrss does not
    (a worker forked from a large parent reported the parent's peak). Elsewhere ru_maxrss
    (KiB on Linux, bytes on macOS).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak // 1024) if sys.platform == "darwin" else int(peak)


def release_free_memory() -> bool:
    """Give the pages Python and ONNX Runtime have freed back to the system.

    glibc keeps freed small blocks (a protobuf model is millions of them) in its heap, so
    a build's resident memory stayed at its quantization peak through the WER check that
    follows; `malloc_trim` returns them. False where the C library has no malloc_trim
    (musl, macOS): nothing is released, nothing breaks.
    """
    gc.collect()
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True
