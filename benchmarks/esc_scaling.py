"""ESC wall time on whisper-tiny.en W8A8: how it scales with the evaluation budget and with the
number of utterances the objective runs on.

Run from the repository root, with nothing else running::

    python benchmarks/esc_scaling.py                     # 6 builds, about 15 min on 2 cores
    python benchmarks/esc_scaling.py --budgets 15 --samples 2 --calib-limit 4   # smoke test

Each point is one ``sfc build`` (``sfc.build.build``, ``--target ort-cpu``, W8A8, ESC, seed
0, no WER evaluation) in this process, one after another. Reported per point: the ESC
search's own seconds (from ``esc.json``: reference transcripts of the FP32 model plus all
candidate evaluations), candidates evaluated, seconds per candidate, and the whole build.
The statistics pass over the calibration set (``--calib-limit``, default all 100
utterances) is the same in every point and is the rest of the build time.

Grid: budgets ``--budgets`` at the default 16 objective utterances, and objective
utterances ``--samples`` at budget ``--samples-budget``. CMA-ES runs whole generations
(population 15 for tiny.en's 44 scales), so a budget of 100 evaluates 90 candidates.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import machine_info, machine_line, outside_repo, print_table, run_or_show

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "benchmarks" / "results" / "esc_scaling.json"
DEFAULT_WORK = Path("/tmp/sfc-esc-scaling")
MODEL = "whisper-tiny.en"
DEFAULT_SAMPLES = 16  # BuildConfig.esc_samples


def measure(budget: int, samples: int, args: argparse.Namespace) -> dict[str, Any]:
    """One ESC build; its timings and search summary."""
    from sfc.build import ESC_RESULT, BuildConfig, build

    out = args.work / f"b{budget}-s{samples}"
    shutil.rmtree(out, ignore_errors=True)
    config = BuildConfig(calibrator="esc", esc_budget=budget, esc_samples=samples,
                         calib_limit=args.calib_limit)
    t0 = time.perf_counter()
    build(MODEL, out, config)
    build_s = time.perf_counter() - t0
    esc = json.loads((out / ESC_RESULT).read_text())
    esc = esc.get("_data", esc)
    shutil.rmtree(out, ignore_errors=True)
    return {"budget": budget, "samples": samples, "evaluations": esc["evaluations"],
            "generations": esc["generations"], "esc_s": esc["seconds"], "build_s": build_s,
            "s_per_candidate": esc["seconds"] / max(1, esc["evaluations"]),
            "start_objective": esc["start_objective"],
            "final_objective": esc["final_objective"], "best_objective": esc["best_objective"]}


def show(report: dict[str, Any]) -> None:
    """Print the measured points."""
    rows = [[str(p["budget"]), str(p["samples"]), str(p["evaluations"]), f"{p['esc_s']:.0f}",
             f"{p['s_per_candidate']:.2f}", f"{p['build_s']:.0f}",
             f"{p['start_objective']:.4f} -> {p['final_objective']:.4f} "
             f"(best {p['best_objective']:.4f})"] for p in report["points"]]
    print_table(f"{MODEL}: ESC wall time (W8A8, {report['calib_limit'] or 100} calibration "
                "utterances for the statistics pass)",
                ["budget", "objective utterances", "candidates", "ESC s", "s / candidate",
                 "build s", "objective start -> final"], rows)


def run(args: argparse.Namespace) -> int:
    from sfc.atomic import write_json_atomic
    from sfc.models import model_folder

    command = shlex.join(["python", *sys.argv])
    # build() leaves ORT its default intra-op pool: one thread per core.
    machine = machine_info(os.cpu_count() or 1)
    print(machine_line(machine))
    print(f"command: {command}", flush=True)
    model_folder(MODEL)  # export (cached) before any timing
    grid = [(b, DEFAULT_SAMPLES) for b in args.budgets]
    grid += [(args.samples_budget, s) for s in args.samples
             if (args.samples_budget, s) not in grid]
    report: dict[str, Any] = {"command": command, "machine": machine, "model": MODEL,
                              "calib_limit": args.calib_limit, "points": []}
    for budget, samples in grid:
        print(f"\n== budget {budget}, {samples} objective utterances", flush=True)
        point = measure(budget, samples, args)
        report["points"].append(point)
        print(f"ESC {point['esc_s']:.0f} s for {point['evaluations']} candidates; "
              f"build {point['build_s']:.0f} s", flush=True)
        write_json_atomic(args.json, report)
    print()
    show(report)
    print(machine_line(machine))
    print(f"command: {command}\nwrote {args.json}")
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)

    def ints(text: str) -> list[int]:
        return [int(t) for t in text.split(",") if t.strip()]

    parser.add_argument("--budgets", type=ints, default=[30, 60, 100])
    parser.add_argument("--samples", type=ints, default=[4, 8, 32])
    parser.add_argument("--samples-budget", type=int, default=60)
    parser.add_argument("--calib-limit", type=int, default=None)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--show", action="store_true", help="only print the saved report")
    args = parser.parse_args(argv)
    args.work = outside_repo(parser, args.work, REPO)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_or_show(parse_args(argv), run, show)


if __name__ == "__main__":
    sys.exit(main())
