"""Jetson telemetry from `tegrastats`: parse its lines, sample it during a run, summarise.

`tegrastats --interval MS` prints one line per interval (RAM, CPU cores, GR3D_FREQ = GPU
load, EMC_FREQ = memory-controller load, power rails). The format differs between L4T
releases: JetPack 6 prefixes a date and writes rails as ``VDD_IN 5263mW/5263mW`` (now /
average); Xavier's L4T 32 writes ``GPU 463/463`` without units. No maintained library
parses it (jetson-stats reads sysfs through its own root service instead), so this module
does, and is tested on real lines from both. The sampler timestamps each line as it
arrives; `summarize` turns the samples into means over a measured window and integrates
the input rail's power into energy per utterance.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

import numpy as np

from ..errors import SfcError

__all__ = [
    "DEFAULT_INTERVAL_MS",
    "Rail",
    "TegraSample",
    "TegraSummary",
    "TegrastatsSampler",
    "parse_line",
    "summarize",
]

# 100 ms: several samples even inside a sub-second transcription of a few clips.
DEFAULT_INTERVAL_MS = 100
# Rails that measure the whole module's input, best first (Orin, then Nano/TX2/Xavier NX).
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")
SUM_OF_RAILS = "sum of rails"

_MB = {"k": 1 / 1024, "M": 1.0, "G": 1024.0}
_STAMP = re.compile(r"^(\d\d-\d\d-\d{4} \d\d:\d\d:\d\d)\s")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)([kMG])B\b")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_CORE = re.compile(r"^(\d+)%(?:@(\d+))?$")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%(?:@\[?([\d,]+)\]?)?")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%(?:@(\d+))?")
# NAME now/avg, with "mW" (L4T >= 34) or without (L4T 32); RAM/SWAP end in "MB" and so
# fail the lookahead.
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")


@dataclass(frozen=True)
class Rail:
    """One power rail: the instantaneous reading and tegrastats' running average, in mW."""

    name: str
    now_mw: float
    avg_mw: float


@dataclass(frozen=True)
class TegraSample:
    """One tegrastats line."""

    ram_used_mb: float
    ram_total_mb: float
    cpu_load_pct: tuple[float | None, ...]  # per core; None for a core that is off
    gpu_load_pct: float | None  # GR3D_FREQ
    gpu_freq_mhz: tuple[int, ...]  # one per GPC on Orin ("@[612,612]"), none when idle
    emc_load_pct: float | None
    emc_freq_mhz: int | None
    rails: tuple[Rail, ...]
    stamp: str | None = None  # JetPack 6's date prefix

    def input_power(self) -> tuple[str, float] | None:
        """(rail, mW) of the module's input power: VDD_IN or POM_5V_IN where the board
        measures it, else the sum of all rails (AGX Xavier and AGX Orin measure no input
        rail, so the sum leaves out what no rail covers)."""
        by_name = {r.name: r.now_mw for r in self.rails}
        for name in INPUT_RAILS:
            if name in by_name:
                return name, by_name[name]
        if not self.rails:
            return None
        return SUM_OF_RAILS, sum(by_name.values())


def _opt_int(text: str | None) -> int | None:
    return None if text is None else int(text)


def parse_line(line: str) -> TegraSample:
    """Parse one tegrastats line (JetPack 4 to 6 formats); SfcError when it is none."""
    ram = _RAM.search(line)
    if ram is None:
        raise SfcError(f"not a tegrastats line (no RAM field): {line.strip()[:80]!r}")
    scale = _MB[ram.group(3)]
    loads: list[float | None] = []
    cpu = _CPU.search(line)
    for core in (cpu.group(1).split(",") if cpu else ()):
        m = _CORE.match(core.strip())
        loads.append(float(m.group(1)) if m else None)  # "off"
    gr3d, emc = _GR3D.search(line), _EMC.search(line)
    stamp = _STAMP.match(line)
    return TegraSample(
        ram_used_mb=int(ram.group(1)) * scale, ram_total_mb=int(ram.group(2)) * scale,
        cpu_load_pct=tuple(loads),
        gpu_load_pct=float(gr3d.group(1)) if gr3d else None,
        gpu_freq_mhz=tuple(int(f) for f in gr3d.group(2).split(",")) if gr3d and gr3d.group(2)
        else (),
        emc_load_pct=float(emc.group(1)) if emc else None,
        emc_freq_mhz=_opt_int(emc.group(2)) if emc else None,
        rails=tuple(Rail(m.group(1), float(m.group(2)), float(m.group(3)))
                    for m in _RAIL.finditer(line)),
        stamp=stamp.group(1) if stamp else None,
    )


@dataclass(frozen=True)
class TegraSummary:
    """tegrastats over one measured window (for Whisper: the transcription of the clips).

    Loads are means over the samples that cover the window; `ram_used_mb` is the largest
    over the whole run (CPU and GPU share the DRAM, so it includes the GPU's buffers);
    power is time-weighted (readings linearly interpolated); `energy_mj_per_item` divides
    the window's energy by its utterances (Whisper) or inferences (other graphs).
    """

    samples: int
    window_s: float
    items: int
    ram_used_mb: float
    ram_total_mb: float
    cpu_load_pct: float | None
    gpu_load_pct: float | None
    gpu_freq_mhz: int | None  # the highest seen
    emc_load_pct: float | None
    emc_freq_mhz: int | None
    rails_mw: dict[str, float]
    power_rail: str | None  # what the energy integrates: VDD_IN, POM_5V_IN or SUM_OF_RAILS
    power_mw: float | None
    energy_mj: float | None
    energy_mj_per_item: float | None


def _mean(values: Sequence[float | None]) -> float | None:
    real = [v for v in values if v is not None]
    return float(np.mean(real)) if real else None


def _integral(times: np.ndarray, values: np.ndarray, start: float, end: float) -> float:
    """∫ value dt over [start, end]: readings linearly interpolated, held flat outside."""
    inside = (times > start) & (times < end)
    t = np.concatenate([[start], times[inside], [end]])
    v = np.interp(t, times, values)
    return float(np.sum((v[1:] + v[:-1]) * np.diff(t)) / 2)


def summarize(timed: Sequence[tuple[float, TegraSample]], start: float, end: float,
              items: int) -> TegraSummary:
    """Summarise `(time, sample)` pairs (times in the clock of `start`/`end`, seconds).

    A line describes the interval before it, so the window's samples are those after
    `start` up to the first at or after `end`.
    """
    if not timed:
        raise SfcError("tegrastats printed no samples during the run")
    if end <= start or items < 1:
        raise SfcError(f"bad telemetry window ({start}, {end}) with {items} item(s)")
    timed = sorted(timed, key=lambda ts: ts[0])
    later = [i for i, (t, _) in enumerate(timed) if t >= end]
    stop = later[0] + 1 if later else len(timed)
    window = [s for t, s in timed[:stop] if t > start] or [timed[stop - 1][1]]
    times = np.array([t for t, _ in timed])
    duration = end - start

    def power(series: Sequence[float]) -> float:
        return _integral(times, np.asarray(series, dtype=float), start, end) / duration

    names = sorted({r.name for _, s in timed for r in s.rails})
    rails_mw = {n: power([next((r.now_mw for r in s.rails if r.name == n), 0.0)
                          for _, s in timed]) for n in names}
    inputs = [s.input_power() for _, s in timed]
    rail = next((p[0] for p in inputs if p is not None), None)
    power_mw = (power([p[1] if p is not None else 0.0 for p in inputs])
                if rail is not None else None)
    energy = power_mw * duration if power_mw is not None else None  # mW * s = mJ
    gpu_f = [f for s in window for f in s.gpu_freq_mhz]
    emc_f = [s.emc_freq_mhz for s in window if s.emc_freq_mhz is not None]
    return TegraSummary(
        samples=len(window), window_s=duration, items=items,
        ram_used_mb=max(s.ram_used_mb for _, s in timed), ram_total_mb=timed[-1][1].ram_total_mb,
        cpu_load_pct=_mean([c for s in window for c in s.cpu_load_pct]),
        gpu_load_pct=_mean([s.gpu_load_pct for s in window]),
        gpu_freq_mhz=max(gpu_f) if gpu_f else None,
        emc_load_pct=_mean([s.emc_load_pct for s in window]),
        emc_freq_mhz=max(emc_f) if emc_f else None,
        rails_mw=rails_mw, power_rail=rail, power_mw=power_mw, energy_mj=energy,
        energy_mj_per_item=energy / items if energy is not None else None,
    )


class TegrastatsSampler:
    """Run `tegrastats --interval MS` in the background and keep its timestamped samples.

    Use as a context manager around the measured work. On exit it waits (bounded) for one
    line after the exit time, so the last measured interval is covered, then terminates
    the process. `command` replaces the tegrastats command line (tests replay real lines).
    """

    def __init__(self, interval_ms: int = DEFAULT_INTERVAL_MS, *,
                 command: Sequence[str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_ms / 1000.0
        self.command = list(command or ["tegrastats", "--interval", str(interval_ms)])
        self.samples: list[tuple[float, TegraSample]] = []
        self.last_unparsed: str | None = None  # e.g. tegrastats' own error message
        self._clock = clock
        self._cond = threading.Condition()
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None
        self._ended = False  # the process closed its output

    def __enter__(self) -> TegrastatsSampler:
        try:
            # stderr joins stdout: a line that does not parse is kept for the error message.
            self._proc = subprocess.Popen(self.command, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, bufsize=1)
        except OSError as exc:
            raise SfcError(f"cannot run {self.command[0]}: {exc}") from None
        self._thread = threading.Thread(target=self._read, name="tegrastats", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            now = self._clock()
            if not line.strip():
                continue
            try:
                sample = parse_line(line)
            except SfcError:
                self.last_unparsed = line.strip()
                continue
            with self._cond:
                self.samples.append((now, sample))
                self._cond.notify_all()
        with self._cond:  # the process ended: wake a waiting `stop`
            self._ended = True
            self._cond.notify_all()

    def stop(self, wait_after: float | None = None) -> None:
        """Stop sampling; with `wait_after`, first wait for a sample later than it."""
        proc = self._proc
        if proc is None:
            return
        if wait_after is not None:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._ended
                    or (bool(self.samples) and self.samples[-1][0] > wait_after),
                    timeout=3 * self.interval_s + 2.0)
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._proc = None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop(wait_after=self._clock() if exc_type is None else None)

    def summary(self, start: float, end: float, items: int) -> TegraSummary:
        """`summarize` of the samples; names tegrastats' own complaint when there are none."""
        if not self.samples:
            why = f": {self.last_unparsed}" if self.last_unparsed else ""
            raise SfcError(f"tegrastats printed no samples during the run{why}")
        return summarize(self.samples, start, end, items)
