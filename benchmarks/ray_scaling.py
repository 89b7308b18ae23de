"""ESC and the two-stage sensitivity probes on Ray workers: Ray's per-task overhead, and one
model's search in-process vs on local Ray workers (same recipe, byte for byte, and how long
each takes).

Run from the repository root, with nothing else running::

    SFC_CACHE=/tmp/sfccache python benchmarks/ray_scaling.py
    SFC_CACHE=/tmp/sfccache python benchmarks/ray_scaling.py --job probes --samples 4
    SFC_CACHE=/tmp/sfccache python benchmarks/ray_scaling.py --model whisper-base
    python benchmarks/shape_true.py whisper-small --out /tmp/small-random   # then:
    SFC_CACHE=/tmp/sfccache python benchmarks/ray_scaling.py --model /tmp/small-random \
        --budget 8 --popsize 4 --samples 2

1. Overhead: a local Ray with two workers; the median of `--round-trips` calls of a no-op
   actor method (submit, run, get), one after the other.
2. Builds: one ``sfc build`` of `--model` (a zoo name or an exported folder, such as a
   shape-true random-weight model from `shape_true.py`) per variant, each in a fresh
   subprocess so that its driver's peak RSS is its own: in-process, then a local Ray with
   each of ``--workers`` workers. `--job esc`: W8A8 with ESC (seed 0, no WER check);
   `--job probes`: weight-only two-stage mixed precision (`--candidates`, 6 average bits)
   whose task probes are the distributed work. Reported per variant: the seconds of the
   distributed part (ESC: ``esc.json``'s search, the MSE start, the generations and the
   final mean, the first and last in the driver; probes: the probe loop alone), seconds per
   task, the whole build, the driver's peak RSS (the whole build, statistics pass
   included) and each worker's peak RSS, and whether every recipe.json and the search's
   values equal the in-process build's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
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
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_WORK = Path("/tmp/sfc-ray-scaling")
MODEL = "whisper-tiny.en"
MARKER = "RAY-SCALING-RESULT "
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
    from sfc.paths import cache_dir
    from sfc.precision import search as search_module
    from sfc.precision.budget import Budget
    from sfc.precision.search import RESULT_FILE, SearchConfig

    workers = None if variant == "in-process" else int(variant)
    out = args.work / variant
    shutil.rmtree(out, ignore_errors=True)
    worker_rss: list[int] = []
    close = executor_module.RayExecutor.close

    def close_and_measure(self: Any) -> None:  # the workers' peak, before they go
        worker_rss.extend(self.peak_rss())
        close(self)

    executor_module.RayExecutor.close = close_and_measure  # type: ignore[method-assign]
    probe_s: list[float] = []
    run_probes = search_module.run_probes

    def timed_probes(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return run_probes(*a, **k)
        finally:
            probe_s.append(time.perf_counter() - t)

    search_module.run_probes = timed_probes  # type: ignore[assignment]
    if args.job == "esc":
        config = BuildConfig(calibrator="esc", esc_budget=args.budget, esc_samples=args.samples,
                             esc_popsize=args.popsize, calib_limit=args.calib_limit,
                             workers=workers)
    else:
        # 6 bits: between the default candidates' 8 and 4/32 (5.17 with zero points).
        search = SearchConfig(Budget(avg_bits=6.0), candidates=tuple(args.candidates.split(",")),
                              samples=args.samples)
        config = BuildConfig(activations=None, calibrator="mse", weights="mixed", search=search,
                             calib_limit=args.calib_limit, workers=workers)
    # Probe results are cached by what they depend on: each variant gets a fresh cache (the
    # zoo exports linked in from the real one), so that it measures its probes afresh.
    shared = cache_dir()
    private = args.work / f"cache-{variant}"
    shutil.rmtree(private, ignore_errors=True)
    private.mkdir(parents=True)
    if (shared / "exports").is_dir():
        (private / "exports").symlink_to(shared / "exports")
    os.environ["SFC_CACHE"] = str(private)
    t0 = time.perf_counter()
    build(args.model, out, config)
    build_s = time.perf_counter() - t0
    # Digests, not the recipes: equal digests are what "same recipe" compares.
    recipes = {g: hashlib.sha256((out / g / "recipe.json").read_bytes()).hexdigest()
               for g in sorted(p.parent.name for p in out.glob("*/recipe.json"))}
    point: dict[str, Any] = {
        "variant": variant, "workers": workers, "build_s": build_s,
        "driver_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "worker_peak_rss": worker_rss, "recipes": recipes}
    if args.job == "esc":
        esc = json.loads((out / ESC_RESULT).read_text())["_data"]
        return point | {"seconds": esc["seconds"], "tasks": esc["evaluations"],
                        "generations": esc["generations"], "scales": esc["scales"],
                        "values": esc["values"], "final_objective": esc["final_objective"]}
    result = json.loads((out / RESULT_FILE).read_text())
    values = [o["sensitivity"] for c in result["layers"] for o in c["options"]]
    return point | {"seconds": sum(probe_s),
                    "tasks": sum(len(c["options"]) for c in result["layers"]) + 1,
                    "scales": {}, "values": values}


def _label(model: str) -> str:
    """The model's name for the report: a zoo name, or an export folder's card name."""
    folder = Path(model)
    if folder.is_dir():
        card = json.loads((folder / "card.json").read_text())
        return str(card.get("_data", card)["name"])
    return model


def run(args: argparse.Namespace) -> int:
    from sfc.atomic import write_json_atomic
    from sfc.models import model_folder

    command = shlex.join(["python", *sys.argv])
    machine = machine_info(os.cpu_count() or 1)
    print(machine_line(machine))
    print(f"command: {command}", flush=True)
    report: dict[str, Any] = {"command": command, "machine": machine,
                              "model": _label(args.model), "job": args.job,
                              "budget": args.budget, "popsize": args.popsize,
                              "candidates": args.candidates, "samples": args.samples,
                              "calib_limit": args.calib_limit,
                              "overhead": overhead(args.round_trips), "builds": []}
    print(f"Ray no-op round trip: median {report['overhead']['median_us']:.0f} us", flush=True)
    model_folder(args.model)  # export (cached) before any timing
    for variant in ["in-process", *map(str, args.workers)]:
        print(f"\n== {variant}", flush=True)
        cmd = [sys.executable, __file__, "--one", variant, "--model", args.model,
               "--job", args.job, "--budget", str(args.budget), "--samples", str(args.samples),
               "--candidates", args.candidates, "--work", str(args.work)]
        if args.popsize is not None:
            cmd += ["--popsize", str(args.popsize)]
        if args.calib_limit is not None:
            cmd += ["--calib-limit", str(args.calib_limit)]
        point = run_marked_worker(cmd, variant, MARKER)
        first = report["builds"][0] if report["builds"] else point
        point["same_as_in_process"] = all(point[k] == first[k]
                                          for k in ("recipes", "scales", "values"))
        report["builds"].append(point)
        print(f"{args.job} {point['seconds']:.1f} s; build {point['build_s']:.0f} s; same "
              f"recipe: {point['same_as_in_process']}", flush=True)
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
    job = report.get("job", "esc")
    base = report["builds"][0]
    rows = []
    for b in report["builds"]:
        seconds = b.get("seconds", b.get("esc_s"))  # esc_s: reports of the first version
        tasks = b.get("tasks", b.get("evaluations"))
        workers = b["workers"] or 1
        base_s = base.get("seconds", base.get("esc_s"))
        efficiency = "-" if b["workers"] is None else f"{base_s / seconds / workers:.2f}"
        rows.append([b["variant"], str(tasks), f"{seconds:.1f}", f"{seconds / max(1, tasks):.2f}",
                     efficiency, f"{b['build_s']:.0f}", f"{b['driver_peak_rss'] / mb:.0f}",
                     ", ".join(f"{r / mb:.0f}" for r in b["worker_peak_rss"]) or "-",
                     "yes" if b["same_as_in_process"] else "NO"])
    what = (f"ESC (budget {report['budget']}, population {report.get('popsize') or 'default'})"
            if job == "esc" else f"two-stage probes (candidates {report['candidates']})")
    print_table(f"{report['model']}: {what} in-process vs local Ray workers, "
                f"{report['samples']} objective utterances, "
                f"{report['calib_limit'] or 100} calibration utterances",
                ["executor", "tasks", f"{job} s", "s / task",
                 "efficiency vs in-process", "build s", "driver peak MB", "worker peak MB",
                 "same recipe"], rows)
    for line in projection(report):
        print(line)
    print(machine_line(report["machine"]))


def projection(report: dict[str, Any], sizes: Sequence[int] = (8, 64)) -> list[str]:
    """A projection, not a measurement: the distributed part on `sizes` workers, each like
    the measured one-worker variant (a whole machine of this kind), from its seconds per
    task; ESC's generations wait for their slowest round, probes are one pool of tasks.
    The build's other parts (calibration pass, FP32 reference, lowering) do not shrink."""
    one = next((b for b in report["builds"] if b["workers"] == 1), None)
    if one is None:
        return []
    seconds = one.get("seconds", one.get("esc_s"))
    tasks = one.get("tasks", one.get("evaluations"))
    per_task = seconds / max(1, tasks)
    rest = one["build_s"] - seconds
    if report.get("job", "esc") == "esc":
        generations = max(1, one.get("generations") or 1)
        population = math.ceil(tasks / generations)
        rounds = {w: generations * math.ceil(population / w) for w in sizes}
        what = f"{generations} generations of {population}"
    else:
        rounds = {w: math.ceil(tasks / w) for w in sizes}
        what = f"{tasks} probes"
    cells = ", ".join(f"{w} workers {rounds[w] * per_task:.1f} s" for w in sizes)
    return [f"projection, not a measurement ({what}, {per_task:.2f} s per task on one worker "
            f"of this machine): {cells}; the build's other {rest:.0f} s stay"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--model", default=MODEL, help="zoo name or exported folder")
    parser.add_argument("--job", choices=("esc", "probes"), default="esc")
    parser.add_argument("--workers", type=lambda t: [int(x) for x in t.split(",") if x],
                        default=[1, 2])
    parser.add_argument("--budget", type=int, default=30, help="esc: candidate evaluations")
    parser.add_argument("--popsize", type=int, default=None, help="esc: CMA-ES population")
    parser.add_argument("--candidates", default="8,4/32", help="probes: formats per weight")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--calib-limit", type=int, default=16)
    parser.add_argument("--round-trips", type=int, default=200)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--json", type=Path, default=None,
                        help="default: results/ray_scaling_<model>_<job>.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # one build, in a subprocess
    parser.add_argument("--show", action="store_true", help="only print the saved report")
    args = parser.parse_args(argv)
    args.work = outside_repo(parser, args.work, REPO)
    if args.json is None:
        args.json = RESULTS / f"ray_scaling_{_label(args.model)}_{args.job}.json"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        print(MARKER + json.dumps(one(args.one, args)), flush=True)
        return 0
    return run_or_show(args, run, show)


if __name__ == "__main__":
    sys.exit(main())
