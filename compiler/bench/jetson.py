"""Which Jetson this is: board model, L4T release and nvpmodel power mode.

Read on the device by the benchmark worker (so a remote bench reports the remote board).
Commands go through a `CommandRunner` (stdout of a command, or None when it cannot run)
and files are read under `root`, so tests give fakes; the parsers are pure functions.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CommandRunner",
    "JetsonInfo",
    "jetson_info",
    "parse_dpkg_version",
    "parse_nvpmodel",
    "parse_tegra_release",
    "run_command",
]

# argv -> stdout, or None when the command is missing, fails or hangs.
CommandRunner = Callable[[Sequence[str]], str | None]

_RELEASE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)")
_DPKG = re.compile(r"^(\d+(?:\.\d+)+)")
_MODE = re.compile(r"NV Power Mode:\s*(\S+)")


def run_command(argv: Sequence[str], timeout_s: float = 10.0) -> str | None:
    """Run `argv` locally and return its stdout; None when it cannot run or exits non-zero."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def parse_tegra_release(text: str) -> str | None:
    """"36.4.0" from /etc/nv_tegra_release's "# R36 (release), REVISION: 4.0, ..."."""
    m = _RELEASE.search(text)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def parse_dpkg_version(text: str) -> str | None:
    """"36.4.0" from nvidia-l4t-core's package version "36.4.0-20240912212859"."""
    m = _DPKG.match(text.strip())
    return m.group(1) if m else None


def parse_nvpmodel(text: str) -> tuple[str | None, int | None]:
    """(mode name, mode id) from `nvpmodel -q`: "NV Power Mode: MAXN" then the id alone on
    a line (NVPM warnings may come first)."""
    m = _MODE.search(text)
    ids = [ln.strip() for ln in text[m.end():].splitlines() if ln.strip().isdigit()] if m else []
    return (m.group(1) if m else None), (int(ids[0]) if ids else None)


@dataclass(frozen=True)
class JetsonInfo:
    """The board and its software, as a benchmark records them."""

    model: str | None  # /proc/device-tree/model, e.g. "NVIDIA Jetson AGX Orin Developer Kit"
    l4t: str | None  # L4T release, e.g. "36.4.0" (JetPack 6.1)
    power_mode: str | None  # nvpmodel's mode name, e.g. "MAXN" or "15W"
    power_mode_id: int | None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def jetson_info(run: CommandRunner = run_command, root: Path = Path("/")) -> JetsonInfo:
    """Describe this Jetson; fields that cannot be read are None."""
    model = _read(root / "proc/device-tree/model")
    release = _read(root / "etc/nv_tegra_release")
    l4t = parse_tegra_release(release) if release else None
    if l4t is None:  # images without the file still carry the L4T core package
        version = run(["dpkg-query", "-W", "-f=${Version}", "nvidia-l4t-core"])
        l4t = parse_dpkg_version(version) if version else None
    mode, mode_id = parse_nvpmodel(run(["nvpmodel", "-q"]) or "")
    return JetsonInfo(model=model.strip("\x00 \n") if model else None, l4t=l4t,
                      power_mode=mode, power_mode_id=mode_id)
