"""Benchmark results: one worker run, one variant's summary, the whole report, and a table.

Everything here is plain data that round-trips through JSON in a versioned envelope
``{"_type", "_version", "_data"}``; loading accepts only the types listed in `_KNOWN_TYPES`,
so a stale or foreign file fails loudly. Reports are rendered from this data, never from
live state. No heavy imports: the worker on an edge device imports this module too.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from ..atomic import write_json_atomic
from ..errors import SfcError
from ..serial import read_text, unwrap
from .backends import KINDS
from .cuda import GpuSnapshot
from .tegrastats import TegraSummary

__all__ = [
    "BenchReport",
    "DeviceStats",
    "LatencyStats",
    "VariantResult",
    "WorkerArgs",
    "WorkerResult",
    "bench_payload",
    "envelope",
    "latency_stats",
    "parse_output",
    "render",
    "summarize_device",
    "summarize_variant",
]

# Every type this package writes, with the one version it reads back.
_KNOWN_TYPES: Mapping[str, int] = {
    "WorkerResult": 1,
    "WorkerError": 1,
    "DeviceInfo": 1,
    "BenchReport": 1,
}


def envelope(kind: str, data: Any) -> dict[str, Any]:
    """Wrap `data` as a versioned envelope of a known type."""
    return {"_type": kind, "_version": _KNOWN_TYPES[kind], "_data": data}


def bench_payload(obj: Any, expected: str) -> dict[str, Any]:
    """The payload of a bench envelope of type `expected` (SfcError otherwise)."""
    return unwrap(obj, expected, _KNOWN_TYPES, "bench result")


@dataclass(frozen=True)
class WorkerArgs:
    """Everything a worker needs; travels as one JSON argument.

    `dims` gives symbolic input dimensions a size (others become 1). `inputs` is an .npz
    keyed by input name, used instead of random inputs. Paths are as the device sees them.
    `device` is the kind of device the worker runs as (`backends.KINDS`).
    """

    artifact: str = ""
    mode: str = "bench"  # "bench" or "describe"
    device: str = "cpu"
    threads: int | None = None
    runs: int = 20
    warmup: int = 3
    clips: tuple[str, ...] = ()
    inputs: str | None = None
    dims: dict[str, int] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("bench", "describe"):
            raise SfcError(f"unknown worker mode {self.mode!r} (bench or describe)")
        if self.device not in KINDS:
            raise SfcError(f"unknown device kind {self.device!r} (expected {', '.join(KINDS)})")
        if self.runs < 1 or self.warmup < 0:
            raise SfcError(f"runs must be >= 1 and warmup >= 0 (got {self.runs}, {self.warmup})")
        if self.threads is not None and self.threads < 1:
            raise SfcError(f"threads must be >= 1 (got {self.threads})")

    def to_json(self) -> str:
        """One-line JSON for the command line."""
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> WorkerArgs:
        """Parse `to_json` output; SfcError on anything else."""
        try:
            d = json.loads(text)
            d["clips"] = tuple(d.get("clips", ()))
            return cls(**d)
        except (json.JSONDecodeError, TypeError, AttributeError) as exc:
            raise SfcError(f"bad worker arguments: {exc}") from None

    def argv(self) -> list[str]:
        """The worker's command-line arguments (after `python -m sfc.bench.worker`)."""
        return ["--json-args", self.to_json()]


def parse_output(stdout: str) -> dict[str, Any]:
    """The envelope in a worker's stdout: its last line that parses as a JSON object."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    return obj
    raise SfcError("the benchmark worker printed no result line")


@dataclass(frozen=True)
class WorkerResult:
    """What one worker process measured for one artifact (one round of one variant).

    `latency_ms`: per inference, one encoder window (Whisper) or one whole-graph run
    (generic). `decoder_step_ms`: every step of one greedy decode of a real clip (the first
    step runs the whole prompt). `transcribe_s` / `audio_s`: end-to-end transcription of
    the clips (features, encoder, decoder; file reading excluded). `peak_rss_kib`: the
    worker's peak resident memory after the run (ru_maxrss). `gpu`: NVML right after the
    timed runs, the sessions still open (cuda; jetson where NVML exists). `tegrastats`:
    Jetson telemetry over the transcription of the clips (Whisper) or the timed runs.
    """

    artifact: str
    kind: str  # "whisper" or "generic"
    threads: int | None
    load_s: float
    latency_ms: tuple[float, ...]
    peak_rss_kib: int
    decoder_step_ms: tuple[float, ...] = ()
    audio_s: float = 0.0
    transcribe_s: float = 0.0
    gpu: GpuSnapshot | None = None
    tegrastats: TegraSummary | None = None

    @property
    def rtf(self) -> float | None:
        """Real-time factor of end-to-end transcription (below 1 is faster than real time)."""
        return self.transcribe_s / self.audio_s if self.audio_s > 0 else None

    def to_dict(self) -> dict[str, Any]:
        """The versioned envelope."""
        return envelope("WorkerResult", asdict(self))

    @classmethod
    def from_data(cls, d: Mapping[str, Any]) -> WorkerResult:
        """Rebuild from the payload of `to_dict`."""
        return cls(
            artifact=str(d["artifact"]), kind=str(d["kind"]),
            threads=None if d["threads"] is None else int(d["threads"]),
            load_s=float(d["load_s"]),
            latency_ms=tuple(float(x) for x in d["latency_ms"]),
            peak_rss_kib=int(d["peak_rss_kib"]),
            decoder_step_ms=tuple(float(x) for x in d.get("decoder_step_ms", ())),
            audio_s=float(d.get("audio_s", 0.0)),
            transcribe_s=float(d.get("transcribe_s", 0.0)),
            gpu=None if d.get("gpu") is None else GpuSnapshot(**d["gpu"]),
            tegrastats=None if d.get("tegrastats") is None else TegraSummary(**d["tegrastats"]),
        )

    @classmethod
    def from_dict(cls, obj: Any) -> WorkerResult:
        """Rebuild from the envelope of `to_dict`."""
        data = bench_payload(obj, "WorkerResult")
        try:
            return cls.from_data(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise SfcError(f"malformed WorkerResult: {exc!r}") from None


@dataclass(frozen=True)
class LatencyStats:
    """Percentiles and mean of a set of latencies, in milliseconds."""

    p50: float
    p90: float
    p99: float
    mean: float
    n: int


def _percentile(sorted_ms: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of sorted samples."""
    pos = (len(sorted_ms) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (pos - lo)


def latency_stats(samples_ms: Sequence[float]) -> LatencyStats:
    """p50/p90/p99/mean of `samples_ms`; SfcError when there are none."""
    if not samples_ms:
        raise SfcError("no latency samples to summarize")
    s = sorted(samples_ms)
    return LatencyStats(p50=_percentile(s, 50), p90=_percentile(s, 90), p99=_percentile(s, 99),
                        mean=statistics.fmean(s), n=len(s))


def _median_stats(per_round: Sequence[LatencyStats]) -> LatencyStats:
    """Each statistic's median over rounds (rounds are the independent repeats)."""
    med = statistics.median
    return LatencyStats(p50=med(s.p50 for s in per_round), p90=med(s.p90 for s in per_round),
                        p99=med(s.p99 for s in per_round), mean=med(s.mean for s in per_round),
                        n=sum(s.n for s in per_round))


@dataclass(frozen=True)
class DeviceStats:
    """A variant's GPU and Jetson readings over its rounds; None where not measured.

    `gpu_mem_mib`: NVML's memory of the worker process (device-wide use where NVML lists no
    processes), the largest over rounds; clocks: NVML right after the timed runs, median.
    tegrastats (medians over rounds, except `ram_used_mib`, the largest): RAM used by CPU
    and GPU together, GR3D (GPU) and EMC (memory controller) load, mean power on
    `power_rail` and energy per utterance (Whisper) or per inference (other graphs).
    """

    gpu_mem_mib: float | None = None
    sm_clock_mhz: float | None = None
    mem_clock_mhz: float | None = None
    ram_used_mib: float | None = None
    gpu_load_pct: float | None = None
    emc_load_pct: float | None = None
    power_rail: str | None = None
    power_w: float | None = None
    energy_mj: float | None = None


def _median(values: Sequence[float | None]) -> float | None:
    real = [v for v in values if v is not None]
    return statistics.median(real) if real else None


def summarize_device(rounds: Sequence[WorkerResult]) -> DeviceStats | None:
    """`DeviceStats` of one variant's rounds; None when no round read a GPU or tegrastats."""
    gpus = [r.gpu for r in rounds if r.gpu is not None]
    tegra = [r.tegrastats for r in rounds if r.tegrastats is not None]
    if not gpus and not tegra:
        return None
    mems = [g.process_memory_mib if g.process_memory_mib is not None else g.memory_used_mib
            for g in gpus]
    power = _median([t.power_mw for t in tegra])
    return DeviceStats(
        gpu_mem_mib=max(mems) if mems else None,
        sm_clock_mhz=_median([g.sm_clock_mhz for g in gpus]),
        mem_clock_mhz=_median([g.mem_clock_mhz for g in gpus]),
        ram_used_mib=max((t.ram_used_mb for t in tegra), default=None),
        gpu_load_pct=_median([t.gpu_load_pct for t in tegra]),
        emc_load_pct=_median([t.emc_load_pct for t in tegra]),
        power_rail=next((t.power_rail for t in tegra if t.power_rail), None),
        power_w=power / 1000.0 if power is not None else None,
        energy_mj=_median([t.energy_mj_per_item for t in tegra]),
    )


@dataclass(frozen=True)
class VariantResult:
    """One benchmarked artifact summarised over rounds.

    Each statistic is the median over rounds of that round's statistic. `ratio` is the
    median over rounds of (this p50 / baseline p50 in the same round): pairing by round
    cancels the drift that separate medians would keep; below 1 is faster than baseline.
    """

    label: str
    artifact: str
    kind: str
    bytes: int
    latency: LatencyStats
    throughput: float  # windows (Whisper) or inferences (generic) per second, one stream
    peak_rss_kib: int  # the largest over rounds
    load_s: float
    decoder_step: LatencyStats | None = None  # steps after the prompt step
    rtf: float | None = None
    ratio: float | None = None
    rtf_ratio: float | None = None
    rounds: tuple[WorkerResult, ...] = ()
    device_stats: DeviceStats | None = None

    @classmethod
    def from_data(cls, d: Mapping[str, Any]) -> VariantResult:
        """Rebuild from `asdict` output."""
        opt = _opt_float
        return cls(
            label=str(d["label"]), artifact=str(d["artifact"]), kind=str(d["kind"]),
            bytes=int(d["bytes"]), latency=LatencyStats(**d["latency"]),
            throughput=float(d["throughput"]), peak_rss_kib=int(d["peak_rss_kib"]),
            load_s=float(d["load_s"]),
            decoder_step=(None if d.get("decoder_step") is None
                          else LatencyStats(**d["decoder_step"])),
            rtf=opt(d.get("rtf")), ratio=opt(d.get("ratio")), rtf_ratio=opt(d.get("rtf_ratio")),
            rounds=tuple(WorkerResult.from_data(r) for r in d.get("rounds", ())),
            device_stats=(None if d.get("device_stats") is None
                          else DeviceStats(**d["device_stats"])),
        )


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _ratios(mine: Sequence[float | None], base: Sequence[float | None]) -> float | None:
    pairs = [m / b for m, b in zip(mine, base, strict=True)
             if m is not None and b is not None and b > 0]
    return statistics.median(pairs) if pairs else None


def summarize_variant(label: str, artifact: str, size: int, rounds: Sequence[WorkerResult],
                      baseline: Sequence[WorkerResult] | None = None) -> VariantResult:
    """Summarise one variant's rounds; `baseline` is the baseline's rounds, same order."""
    if not rounds:
        raise SfcError(f"no measurements for {label}")
    per_round = [latency_stats(r.latency_ms) for r in rounds]
    steps = [latency_stats(r.decoder_step_ms[1:]) for r in rounds if len(r.decoder_step_ms) > 1]
    rtfs = [r.rtf for r in rounds if r.rtf is not None]
    ratio = rtf_ratio = None
    if baseline is not None:
        ratio = _ratios([s.p50 for s in per_round],
                        [latency_stats(b.latency_ms).p50 for b in baseline])
        rtf_ratio = _ratios([r.rtf for r in rounds], [b.rtf for b in baseline])
    return VariantResult(
        label=label, artifact=artifact, kind=rounds[0].kind, bytes=size,
        latency=_median_stats(per_round),
        throughput=statistics.median(1000.0 / s.mean for s in per_round),
        peak_rss_kib=max(r.peak_rss_kib for r in rounds),
        load_s=statistics.median(r.load_s for r in rounds),
        decoder_step=_median_stats(steps) if steps else None,
        rtf=statistics.median(rtfs) if rtfs else None,
        ratio=ratio, rtf_ratio=rtf_ratio, rounds=tuple(rounds),
        device_stats=summarize_device(rounds),
    )


@dataclass(frozen=True)
class BenchReport:
    """A benchmark of one or more artifacts on one device, with the settings that made it."""

    device: str
    device_info: dict[str, Any]
    threads: int | None
    runs: int
    warmup: int
    rounds: int
    clips: tuple[str, ...]
    baseline: str | None  # label of the baseline variant
    variants: tuple[VariantResult, ...]
    order: str = "alternating"  # A B, B A, A B, ...: each variant its own process per round
    created: str = ""
    warnings: tuple[str, ...] = field(default=())

    def variant(self, label: str) -> VariantResult:
        """The variant named `label`."""
        for v in self.variants:
            if v.label == label:
                return v
        raise SfcError(f"no variant {label!r} in this report "
                       f"({', '.join(v.label for v in self.variants)})")

    def to_dict(self) -> dict[str, Any]:
        """The versioned JSON-ready envelope."""
        return envelope("BenchReport", asdict(self))

    def to_json(self) -> str:
        """Serialise to a JSON string."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, obj: Any) -> BenchReport:
        """Rebuild a report from its envelope; SfcError on unknown or malformed input."""
        d = bench_payload(obj, "BenchReport")
        try:
            return cls(
                device=str(d["device"]), device_info=dict(d["device_info"]),
                threads=None if d["threads"] is None else int(d["threads"]),
                runs=int(d["runs"]), warmup=int(d["warmup"]), rounds=int(d["rounds"]),
                clips=tuple(str(c) for c in d["clips"]),
                baseline=None if d["baseline"] is None else str(d["baseline"]),
                variants=tuple(VariantResult.from_data(v) for v in d["variants"]),
                order=str(d.get("order", "alternating")), created=str(d.get("created", "")),
                warnings=tuple(str(w) for w in d.get("warnings", ())),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SfcError(f"malformed BenchReport: {exc!r}") from None

    @classmethod
    def from_json(cls, text: str) -> BenchReport:
        """Parse a report written by `to_json`."""
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise SfcError(f"invalid bench report JSON: {exc}") from None

    def save(self, path: str | Path) -> None:
        """Write the report to `path` atomically."""
        write_json_atomic(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> BenchReport:
        """Read a report written by `save`."""
        return cls.from_json(read_text(path, "bench report"))


def _fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _title(report: BenchReport) -> Text:
    """Device, hardware and software in one line: the CPU, and the GPU or Jetson board."""
    info = report.device_info
    threads = "ORT default" if report.threads is None else str(report.threads)
    parts = [f"{info.get('cpu', '?')} ({info.get('cores', '?')} cores)"]
    jetson, gpu = info.get("jetson"), info.get("gpu")
    if isinstance(jetson, dict):
        parts = [f"{jetson.get('model') or 'Jetson'}, L4T {jetson.get('l4t') or '?'}, "
                 f"power mode {jetson.get('power_mode') or '?'}"]
    if isinstance(gpu, dict):
        parts.append(f"{gpu.get('name')} ({float(gpu.get('memory_total_mib', 0)) / 1024:.0f} "
                     f"GiB, SM max {gpu.get('sm_clock_max_mhz')} MHz), driver {gpu.get('driver')}")
    timing = f", {info['timing']}" if info.get("timing") else ""
    return Text(f"{report.device}: {'; '.join(parts)}, ORT {info.get('onnxruntime', '?')}, "
                f"threads {threads}{timing}")


# Device columns: (header, DeviceStats field, format); shown when any variant has a value.
_DEVICE_COLUMNS = (
    ("GPU MiB", "gpu_mem_mib", ".0f"),
    ("SM MHz", "sm_clock_mhz", ".0f"),
    ("RAM MiB", "ram_used_mib", ".0f"),
    ("GR3D %", "gpu_load_pct", ".0f"),
    ("EMC %", "emc_load_pct", ".0f"),
    ("W", "power_w", ".2f"),
    ("mJ/item", "energy_mj", ".1f"),
)


def render(report: BenchReport) -> Table:
    """A rich table: size, latency percentiles, throughput, decoder step, RTF, memory, ratio,
    and the GPU/Jetson columns the report has."""
    stats = [v.device_stats for v in report.variants]
    device_cols = [c for c in _DEVICE_COLUMNS
                   if any(s is not None and getattr(s, c[1]) is not None for s in stats)]
    notes = []
    rail = next((s.power_rail for s in stats if s is not None and s.power_rail), None)
    if rail is not None:
        item = "utterance" if any(v.kind == "whisper" for v in report.variants) else "inference"
        notes.append(f"W and mJ/item: the {rail} rail (tegrastats) over the measured part, "
                     f"energy per {item}; RAM: CPU and GPU together")
    table = Table(
        title=_title(report),
        caption=Text.assemble(
            f"{report.rounds} rounds x {report.runs} runs (warm-up {report.warmup}), "
            f"{report.order} order, one process per variant per round; statistics are "
            f"medians over rounds; ratio = median per-round p50 / baseline p50"
            + "".join(f"\n{n}" for n in notes),
            *(part for w in report.warnings for part in ("\n", ("warning:", "yellow"), f" {w}"))),
    )
    for col in ("variant", "MB", "p50 ms", "p90 ms", "p99 ms", "mean ms", "win/s",
                "dec step ms", "RTF", "RSS MiB", *(c[0] for c in device_cols), "x baseline"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for v in report.variants:
        label = f"{v.label} (baseline)" if v.label == report.baseline else v.label
        step = v.decoder_step.p50 if v.decoder_step else None
        table.add_row(
            Text(label), f"{v.bytes / 1e6:.1f}", _fmt(v.latency.p50), _fmt(v.latency.p90),
            _fmt(v.latency.p99), _fmt(v.latency.mean), _fmt(v.throughput, ".2f"),
            _fmt(step, ".2f"), _fmt(v.rtf, ".3f"), f"{v.peak_rss_kib / 1024:.0f}",
            *(_fmt(getattr(v.device_stats, f) if v.device_stats else None, spec)
              for _, f, spec in device_cols),
            _fmt(v.ratio, ".2f"),
        )
    return table
