"""Where a two-stage probes build's driver memory goes: its resident set sampled every 0.25 s
through one in-process build (the build of ``ray_scaling.py --job probes``: weight-only, 6
average bits, candidates 8 and 4/32), each build phase marked, and what it held at the
start of the probes.

Run from the repository root, with nothing else running::

    SFC_CACHE=/tmp/sfccache python benchmarks/probe_memory.py --model whisper-base \
        --samples 2 --work /tmp/probe-memory-base --json RESULT.json

Prints one line per phase boundary (seconds, resident MB, phase) and writes the events, the
sampled timeline and a summary (VmHWM, resident at the start of the probes, the probes'
seconds and highest sample, the build's seconds). An older install of sfc runs it the same
way (its own Python), which is how the old code was measured in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def _status(field: str) -> float:
    """MB of a /proc/self/status field (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


class Recorder:
    """The sampled timeline and the marked events, both (seconds, MB[, what])."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.timeline: list[tuple[float, float]] = []
        self.events: list[tuple[float, float, str]] = []
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.timeline.append((time.perf_counter() - self.t0, _status("VmRSS")))
            self._stop.wait(0.25)

    def mark(self, what: str) -> None:
        self.events.append((time.perf_counter() - self.t0, _status("VmRSS"), what))
        t, mb, _ = self.events[-1]
        print(f"[{t:7.1f} s {mb:8.0f} MB] {what}", flush=True)

    def wrap(self, owner: Any, name: str) -> None:
        """Mark entry and exit of `owner.name` (a module function or a method)."""
        inner: Callable[..., Any] = getattr(owner, name)

        def marked(*args: Any, **kwargs: Any) -> Any:
            self.mark(f"> {name}")
            try:
                return inner(*args, **kwargs)
            finally:
                self.mark(f"< {name}")

        setattr(owner, name, marked)

    def stop(self) -> None:
        self._stop.set()


def _held(pending: Sequence[Any]) -> list[str]:
    """What each graph holds besides its sessions: the model proto and the weight cache."""
    out = []
    for g in pending:
        cached = sum(a.nbytes for v in g.quantized.values() for a in v[:2]
                     if hasattr(a, "nbytes"))
        out.append(f"{g.name}: model {g.model.ByteSize() / 2**20:.0f} MB, quantized "
                   f"cache {cached / 2**20:.0f} MB ({len(g.quantized)})")
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from sfc import build as build_module
    from sfc.build import BuildConfig, build
    from sfc.precision import search as search_module
    from sfc.precision.budget import Budget
    from sfc.precision.search import SearchConfig

    rec = Recorder()
    pending: list[Any] = []
    search = build_module._search

    def keep_pending(graphs: list[Any], *a: Any, **k: Any) -> None:
        pending[:] = graphs
        search(graphs, *a, **k)

    build_module._search = keep_pending  # type: ignore[assignment]
    run_probes = search_module.run_probes

    def probes(*a: Any, **k: Any) -> Any:
        for line in _held(pending):
            rec.mark(line)
        rec.mark("> run_probes")
        try:
            return run_probes(*a, **k)
        finally:
            rec.mark("< run_probes")

    search_module.run_probes = probes  # type: ignore[assignment]
    for name in ("_fp32_runtime", "_prepare", "_grams", "_stats", "_choose_tied", "_emit"):
        rec.wrap(build_module, name)
    for name in ("switchable", "_verified"):
        rec.wrap(search_module, name)
    rec.wrap(build_module._Graph, "quantize_all")
    # A fresh probe cache (the zoo exports linked in), so the probes run.
    shutil.rmtree(args.work, ignore_errors=True)
    cache = args.work.with_name(args.work.name + "-cache")
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    shared = Path(os.environ.get("SFC_CACHE", Path.home() / ".cache" / "sfc"))
    if (shared / "exports").is_dir():
        (cache / "exports").symlink_to(shared / "exports")
    os.environ["SFC_CACHE"] = str(cache)
    config = BuildConfig(activations=None, calibrator="mse", weights="mixed",
                         search=SearchConfig(Budget(avg_bits=6.0), candidates=("8", "4/32"),
                                             samples=args.samples),
                         calib_limit=args.calib_limit)
    rec.mark("start")
    build(args.model, args.work, config)
    rec.mark("end")
    rec.stop()
    marks = {what: (t, mb) for t, mb, what in rec.events}
    start, end = marks["> run_probes"], marks["< run_probes"]
    during = [mb for t, mb in rec.timeline if start[0] <= t <= end[0]]
    summary = {"vmhwm_mb": _status("VmHWM"), "at_probes_mb": start[1],
               "probes_max_mb": max(during, default=start[1]), "probes_s": end[0] - start[0],
               "build_s": marks["end"][0] - marks["start"][0]}
    print(json.dumps(summary))
    return {"model": args.model, "samples": args.samples, "calib_limit": args.calib_limit,
            "summary": summary, "events": rec.events, "timeline": rec.timeline}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="whisper-tiny.en", help="zoo name or export folder")
    parser.add_argument("--samples", type=int, default=2, help="probe clips")
    parser.add_argument("--calib-limit", type=int, default=16)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sfc-probe-memory"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(args)
    if args.json is not None:
        args.json.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
