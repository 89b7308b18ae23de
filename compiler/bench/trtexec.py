"""Read the performance summary of a `trtexec` log (for users who time engines with it).

trtexec (TensorRT's samples/common/sampleReporting.cpp) ends a timing run with
``=== Performance summary ===`` and lines such as ``Throughput: 41087.7 qps`` and
``Latency: min = 0.387 ms, max = ..., mean = ..., median = ..., percentile(99%) = ... ms``
(TensorRT 8.x prints one percentile, 10.x three by default; every line may carry a
``[date] [I]`` prefix). `parse_trtexec` reads what is there: a log cut short or pasted in
part gives a summary whose missing parts are None and listed in `missing`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from ..errors import SfcError
from ..serial import read_text, unwrap

__all__ = ["TimeStats", "TrtexecSummary", "load_trtexec", "parse_trtexec", "render_trtexec"]

_HEADER = "=== Performance summary ==="
# Printed label -> field, in the order trtexec prints them.
_STATS = {
    "Latency": "latency",
    "Enqueue Time": "enqueue",
    "H2D Latency": "h2d",
    "GPU Compute Time": "gpu_compute",
    "D2H Latency": "d2h",
}
_TOTALS = {"Total Host Walltime": "host_walltime_s", "Total GPU Compute Time": "gpu_compute_s"}
_LINE = re.compile(r"^(?:\[[^\]]*\]\s*)*([A-Za-z0-9 -]+?):\s*(.*)$")
_STAT = re.compile(r"(min|max|mean|median|percentile\(([\d.]+)%\))\s*=\s*([-+\d.eE]+|inf)\s*ms")
_SECONDS = re.compile(r"^([-+\d.eE]+)\s*s\b")
_QPS = re.compile(r"^([-+\d.eE]+)\s*qps\b")
_VERSION = 1


@dataclass(frozen=True)
class TimeStats:
    """One timed quantity over the queries, in milliseconds; `percentiles` as
    (percent, ms) pairs in the order printed."""

    min: float
    max: float
    mean: float
    median: float
    percentiles: tuple[tuple[float, float], ...] = ()

    def percentile(self, q: float) -> float | None:
        """The printed `q`-th percentile, or None when trtexec did not print it."""
        return next((ms for p, ms in self.percentiles if p == q), None)


def _stats(text: str) -> TimeStats | None:
    values: dict[str, float] = {}
    pcts: list[tuple[float, float]] = []
    for m in _STAT.finditer(text):
        if m.group(2) is not None:
            pcts.append((float(m.group(2)), float(m.group(3))))
        else:
            values[m.group(1)] = float(m.group(3))
    if not {"min", "max", "mean", "median"} <= values.keys():
        return None  # a cut line
    return TimeStats(values["min"], values["max"], values["mean"], values["median"],
                     tuple(pcts))


@dataclass(frozen=True)
class TrtexecSummary:
    """trtexec's performance summary; None where the log lacks the line.

    `latency` is H2D + GPU compute + D2H of one query (trtexec's definition); `gpu_compute`
    the kernels alone. (TensorRT 8.0-8.2 also printed an "End-to-End Host Latency" that
    8.4 dropped; it is not read.)
    """

    throughput_qps: float | None = None
    latency: TimeStats | None = None
    enqueue: TimeStats | None = None
    h2d: TimeStats | None = None
    gpu_compute: TimeStats | None = None
    d2h: TimeStats | None = None
    host_walltime_s: float | None = None
    gpu_compute_s: float | None = None

    @property
    def missing(self) -> tuple[str, ...]:
        """The summary lines the log did not have (in trtexec's order)."""
        labels = {"Throughput": "throughput_qps", **_STATS, **_TOTALS}
        return tuple(label for label, f in labels.items() if getattr(self, f) is None)

    def to_dict(self) -> dict[str, Any]:
        """The versioned JSON-ready envelope."""
        return {"_type": "TrtexecSummary", "_version": _VERSION, "_data": asdict(self)}

    @classmethod
    def from_dict(cls, obj: Any) -> TrtexecSummary:
        """Rebuild from `to_dict` output; SfcError on anything else."""
        d = unwrap(obj, "TrtexecSummary", {"TrtexecSummary": _VERSION}, "trtexec summary")
        try:
            stats = {f: None if d.get(f) is None else TimeStats(
                min=float(d[f]["min"]), max=float(d[f]["max"]), mean=float(d[f]["mean"]),
                median=float(d[f]["median"]),
                percentiles=tuple((float(p), float(ms)) for p, ms in d[f]["percentiles"]))
                for f in _STATS.values()}
            return cls(throughput_qps=_opt(d.get("throughput_qps")),
                       host_walltime_s=_opt(d.get("host_walltime_s")),
                       gpu_compute_s=_opt(d.get("gpu_compute_s")), **stats)
        except (KeyError, TypeError, ValueError) as exc:
            raise SfcError(f"malformed TrtexecSummary: {exc!r}") from None


def _opt(value: Any) -> float | None:
    return None if value is None else float(value)


def parse_trtexec(text: str, source: str = "the log") -> TrtexecSummary:
    """The (last) performance summary in a trtexec log; SfcError naming `source` when it
    has none."""
    at = text.rfind(_HEADER)
    body = text[at + len(_HEADER):] if at >= 0 else text
    found: dict[str, Any] = {}
    for raw in body.splitlines():
        m = _LINE.match(raw.strip())
        if m is None:
            continue
        label, rest = m.group(1).strip(), m.group(2)
        if label == "Throughput" and (q := _QPS.match(rest)):
            found["throughput_qps"] = float(q.group(1))
        elif label in _STATS and (s := _stats(rest)) is not None:
            found[_STATS[label]] = s
        elif label in _TOTALS and (t := _SECONDS.match(rest)):
            found[_TOTALS[label]] = float(t.group(1))
    if not found:
        raise SfcError(f"no trtexec performance summary in {source} (expected lines such as "
                       "'Throughput: ... qps' and 'Latency: min = ... ms, ...')")
    return TrtexecSummary(**found)


def load_trtexec(path: str | Path) -> TrtexecSummary:
    """`parse_trtexec` of a log file."""
    return parse_trtexec(read_text(path, "trtexec log"), str(path))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def render_trtexec(summary: TrtexecSummary, title: str | Text = "trtexec") -> Table:
    """A rich table: one row per timed quantity, columns min/median/mean/max and every
    printed percentile."""
    rows = [(label, getattr(summary, f)) for label, f in _STATS.items()]
    rows = [(label, s) for label, s in rows if s is not None]
    pcts = sorted({p for _, s in rows for p, _ in s.percentiles})
    throughput = ("-" if summary.throughput_qps is None
                  else f"{summary.throughput_qps:.1f} qps")
    caption = f"throughput {throughput}"
    if summary.missing:
        caption += f"; not in the log: {', '.join(summary.missing)}"
    table = Table(title=title, caption=caption)
    for col in ("ms", "min", "median", "mean", "max", *(f"p{p:g}" for p in pcts)):
        table.add_column(col, justify="left" if col == "ms" else "right")
    for label, s in rows:
        table.add_row(label, _ms(s.min), _ms(s.median), _ms(s.mean), _ms(s.max),
                      *(_ms(s.percentile(p)) for p in pcts))
    return table
