"""This process's peak resident memory: what `sfc build` reports and `sfc bench` measures."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

__all__ = ["peak_rss_kib"]


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
