"""ESC on Ray workers: Ray's per-task overhead, and whisper-tiny.en's ESC in-process vs on
local Ray workers (same recipe, byte for byte, and how long each takes).

Run from the repository root, with nothing else running::

    SFC_CACHE=/tmp/sfccache python benchmarks/esc_scaling_ray.py
    SFC_CACHE=/tmp/sfccache python benchmarks/esc_scaling_ray.py --workers 1,2 --budget 30

1. Overhead: a local Ray with two workers; the median of `--round-trips` calls of a no-op
   actor method (submit, run, get), one after the other.
2. Builds: one ``sfc build`` of whisper-tiny.en (W8A8, ESC, seed 0, no WER check) per
   variant, each in a fresh subprocess so that its driver's peak RSS is its own:
   in-process, then a local Ray with each of ``--workers`` workers. Reported per variant:
   the ESC search's seconds (``esc.json``: the MSE start, the generations and the final
   mean; the first and last run in the driver), seconds per candidate, the whole build,
   the driver's peak RSS (the whole build, statistics pass included) and each worker's
   peak RSS, and whether every recipe.json and esc.json's scales and values equal the
   in-process build's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import (
    machine_info,
    machine_line,
    outside_repo,
    print_table,
    run_marked_worker,
    run_or_show,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "benchmarks" / "results" / "esc_scaling_ray.json"
DEFAULT_WORK = Path("/tmp/sfc-esc-ray")
MODEL = "whisper-tiny.en"
MARKER = "ESC-RAY-RESULT "
GRAPHS = ("encoder", "decoder")


def overhead(round_trips: int) -> dict[str, Any]:
    """Median, p10 and p90 microseconds of a no-op actor call on a local two-CPU Ray."""
    import ray

    class Noop:
        def ping(self) -> None:
            return None

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    start_s = time.perf_counter() - t0
    try:
        actor = ray.remote(Noop).options(num_cpus=1).remote()
        ray.get(actor.ping.remote())  # the actor is up
        times = []
        for _ in range(round_trips):
            t = time.perf_counter()
            ray.get(actor.ping.remote())
            times.append((time.perf_counter() - t) * 1e6)
    finally:
        ray.shutdown()
    q = statistics.quantiles(times, n=10)
    return {"round_trips": round_trips, "median_us": statistics.median(times),
            "p10_us": q[0], "p90_us": q[-1], "ray_start_s": start_s}


def one(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """One build (run in its own process); its timings, memory and outputs."""
    from sfc import executor as executor_module
    from sfc.build import ESC_RESULT, BuildConfig, build

    workers = None if variant == "in-process" else int(variant)
    out = args.work / variant
    shutil.rmtree(out, ignore_errors=True)
    worker_rss: list[int] = []
    close = executor_module.RayExecutor.close

    def close_and_measure(self: Any) -> None:  # the workers' peak, before they go
        worker_rss.extend(self.peak_rss())
        close(self)

    executor_module.RayExecutor.close = close_and_measure  # type: ignore[method-assign]
    config = BuildConfig(calibrator="esc", esc_budget=args.budget, esc_samples=args.samples,
                         calib_limit=args.calib_limit, workers=workers)
    t0 = time.perf_counter()
    build(MODEL, out, config)
    build_s = time.perf_counter() - t0
    esc = json.loads((out / ESC_RESULT).read_text())["_data"]
    # Digests, not the recipes: equal digests are what "same recipe" compares.
    recipes = {g: hashlib.sha256((out / g / "recipe.json").read_bytes()).hexdigest()
               for g in GRAPHS if (out / g / "recipe.json").is_file()}
    return {"variant": variant, "workers": workers, "esc_s": esc["seconds"],
            "evaluations": esc["evaluations"], "generations": esc["generations"],
            "build_s": build_s,
            "driver_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "worker_peak_rss": worker_rss, "scales": esc["scales"], "values": esc["values"],
            "final_objective": esc["final_objective"], "recipes": recipes}


def run(args: argparse.Namespace) -> int:
    from sfc.atomic import write_json_atomic
    from sfc.models import model_folder

    command = shlex.join(["python", *sys.argv])
    machine = machine_info(os.cpu_count() or 1)
    print(machine_line(machine))
    print(f"command: {command}", flush=True)
    report: dict[str, Any] = {"command": command, "machine": machine, "model": MODEL,
                              "budget": args.budget, "samples": args.samples,
                              "calib_limit": args.calib_limit,
                              "overhead": overhead(args.round_trips), "builds": []}
    print(f"Ray no-op round trip: median {report['overhead']['median_us']:.0f} us", flush=True)
    model_folder(MODEL)  # export (cached) before any timing
    for variant in ["in-process", *map(str, args.workers)]:
        print(f"\n== {variant}", flush=True)
        cmd = [sys.executable, __file__, "--one", variant, "--budget", str(args.budget),
               "--samples", str(args.samples), "--work", str(args.work)]
        if args.calib_limit is not None:
            cmd += ["--calib-limit", str(args.calib_limit)]
        point = run_marked_worker(cmd, variant, MARKER)
        first = report["builds"][0] if report["builds"] else point
        point["same_as_in_process"] = all(point[k] == first[k]
                                          for k in ("recipes", "scales", "values"))
        report["builds"].append(point)
        print(f"ESC {point['esc_s']:.1f} s; build {point['build_s']:.0f} s; same recipe: "
              f"{point['same_as_in_process']}", flush=True)
        write_json_atomic(args.json, report)
    print()
    show(report)
    print(f"command: {command}\nwrote {args.json}")
    return 0


def show(report: dict[str, Any]) -> None:
    """Print the measured overhead and builds."""
    o = report["overhead"]
    print(f"Ray no-op actor call, {o['round_trips']} round trips: median {o['median_us']:.0f} us "
          f"(p10 {o['p10_us']:.0f}, p90 {o['p90_us']:.0f}); local Ray start "
          f"{o['ray_start_s']:.1f} s")
    mb = 2**20
    rows = [[b["variant"], str(b["evaluations"]), f"{b['esc_s']:.1f}",
             f"{b['esc_s'] / max(1, b['evaluations']):.2f}", f"{b['build_s']:.0f}",
             f"{b['driver_peak_rss'] / mb:.0f}",
             ", ".join(f"{r / mb:.0f}" for r in b["worker_peak_rss"]) or "-",
             "yes" if b["same_as_in_process"] else "NO"] for b in report["builds"]]
    print_table(f"{report['model']}: ESC in-process vs local Ray workers (budget "
                f"{report['budget']}, {report['samples']} objective utterances, "
                f"{report['calib_limit'] or 100} calibration utterances)",
                ["executor", "candidates", "ESC s", "s / candidate", "build s",
                 "driver peak MB", "worker peak MB", "same recipe"], rows)
    print(machine_line(report["machine"]))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--workers", type=lambda t: [int(x) for x in t.split(",") if x],
                        default=[1, 2])
    parser.add_argument("--budget", type=int, default=30)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--calib-limit", type=int, default=16)
    parser.add_argument("--round-trips", type=int, default=200)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # one build, in a subprocess
    parser.add_argument("--show", action="store_true", help="only print the saved report")
    args = parser.parse_args(argv)
    args.work = outside_repo(parser, args.work, REPO)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        print(MARKER + json.dumps(one(args.one, args)), flush=True)
        return 0
    return run_or_show(args, run, show)


if __name__ == "__main__":
    sys.exit(main())
