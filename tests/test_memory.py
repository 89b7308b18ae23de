"""sfc.memory: the build's peak-memory reading and the release of freed heap pages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sfc.memory import peak_rss_kib

_RSS = ("[int(l.split()[1]) for l in open('/proc/self/status') "
        "if l.startswith('VmRSS:')][0]")


def test_peak_is_at_least_what_the_process_holds() -> None:
    held = bytearray(64 * 2**20)  # touched: resident
    held[::4096] = b"x" * len(held[::4096])
    rss = int(next(line.split()[1] for line in Path("/proc/self/status").read_text()
                   .splitlines() if line.startswith("VmRSS:")))
    assert peak_rss_kib() >= rss >= 64 * 1024
    del held


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")
def test_freed_small_blocks_go_back_to_the_system() -> None:
    """Many small freed blocks stay resident in glibc's heap until trimmed."""
    code = (
        "from sfc.memory import release_free_memory\n"
        f"rss = lambda: {_RSS}\n"
        "blocks = [bytearray(900) for _ in range(400_000)]\n"
        "before = rss(); del blocks; after_free = rss()\n"
        "released = release_free_memory()\n"
        "print(before, after_free, rss(), released)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    before, after_free, after_trim = (int(v) for v in out[:3])
    assert out[3] == "True"
    assert before - after_trim > 250 * 1024  # most of ~360 MB of blocks returned
    assert after_trim < after_free
