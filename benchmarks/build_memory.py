"""Peak resident memory and wall time of `sfc build` against the number of calibration clips.

Run from the repository root::

    python benchmarks/build_memory.py                              # tiny.en: 25, 100, 150 clips
    python benchmarks/build_memory.py --model whisper-base --limits 100 --eval-limit 50
    python benchmarks/build_memory.py --show                       # print the saved table

Each build is the command a user runs (`sfc build MODEL --calib DATA --calib-limit N`: ESC
W8A8, the WER check included unless `--eval-limit` shortens it), one fresh process after
another, never two at once. Its peak resident set size is the kernel's own count for that
process (`os.wait4`'s ru_maxrss: the child is a fresh exec of a small parent), next to the
peak the build writes in its report.md; the wall time is the whole command's, and
`build_s` (the report's) leaves the WER check out. The calibration clips default to
`../shared/datasets/speech-calib` (150 clips; the repository bundles 100 of them).
Builds land under `--work` (outside the repository), and are deleted unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import machine_info, machine_line, outside_repo, print_table, run_or_show

REPO = Path(__file__).resolve().parents[1]
SHARED_CALIB = REPO.parent / "shared" / "datasets" / "speech-calib"
DEFAULT_JSON = REPO / "benchmarks" / "results" / "build_memory.json"


def build_command(model: str, out: Path, calib: Path, limit: int,
                  eval_limit: int | None, threads: int | None) -> list[str]:
    """The `sfc build` command line of one measured build."""
    cmd = [sys.executable, "-m", "sfc.cli", "build", model, "-o", str(out),
           "--calib", str(calib), "--calib-limit", str(limit)]
    if eval_limit is not None:
        cmd += ["--eval-limit", str(eval_limit)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    return cmd


def run_build(cmd: list[str], log: Path) -> tuple[int, float, int]:
    """(exit status, wall seconds, peak RSS in KiB) of one build process."""
    start = time.perf_counter()
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return proc.returncode, time.perf_counter() - start, int(usage.ru_maxrss)


def measure(args: argparse.Namespace) -> int:
    work = args.work
    machine = machine_info(args.threads or os.cpu_count() or 1)
    print(machine_line(machine), flush=True)
    rows: list[dict[str, Any]] = []
    for limit in args.limits:
        out = work / f"{args.model}-n{limit}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = build_command(args.model, out, args.calib, limit, args.eval_limit, args.threads)
        print(f"building with {limit} calibration clips: {' '.join(cmd)}", flush=True)
        rc, wall, peak_kib = run_build(cmd, work / f"{args.model}-n{limit}.log")
        if rc != 0:
            print(f"build failed (exit {rc}); log: {work / f'{args.model}-n{limit}.log'}",
                  file=sys.stderr)
            return 1
        report = json.loads((out / "report.json").read_text())["_data"]
        wer = report.get("wer") or {}
        rows.append({"calib_clips": limit, "peak_rss_mib": peak_kib / 1024,
                     "report_peak_rss_mib": report.get("peak_rss_mib"),
                     "wall_s": wall, "build_s": report["build_s"],
                     "eval_n": wer.get("n"), "delta_wer": wer.get("delta"),
                     "ci": [wer.get("delta_lo"), wer.get("delta_hi")],
                     "lossless": wer.get("lossless")})
        if not args.keep:
            shutil.rmtree(out)
    result = {"machine": machine, "command": " ".join(sys.argv), "model": args.model,
              "calib": str(args.calib), "eval_limit": args.eval_limit, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    show(result)
    return 0


def show(result: dict[str, Any]) -> None:
    print(machine_line(result["machine"]))
    evals = result["eval_limit"] or "all"
    rows = [[str(r["calib_clips"]), f"{r['peak_rss_mib']:.0f}",
             f"{r['wall_s'] / 60:.1f}", f"{r['build_s'] / 60:.1f}",
             "-" if r["delta_wer"] is None else
             f"{100 * r['delta_wer']:+.2f} [{100 * r['ci'][0]:+.2f}, {100 * r['ci'][1]:+.2f}]"]
            for r in result["rows"]]
    print_table(f"sfc build {result['model']} (ESC W8A8), WER check on {evals} eval clips",
                ["calib clips", "peak RSS MiB", "wall min", "build min (no WER check)",
                 "ΔWER points [95% CI]"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="whisper-tiny.en")
    parser.add_argument("--limits", type=int, nargs="+", default=[25, 100, 150],
                        help="calibration clip counts, one build each")
    parser.add_argument("--calib", type=Path, default=SHARED_CALIB,
                        help="calibration manifest folder")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="first N eval clips for the WER check (default: all)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sfc-build-memory"))
    parser.add_argument("--keep", action="store_true", help="keep the build folders")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--show", action="store_true", help="print the saved report")
    args = parser.parse_args(argv)
    if not args.show:
        args.work = outside_repo(parser, args.work, REPO)
        args.work.mkdir(parents=True, exist_ok=True)
        if not (args.calib / "manifest.jsonl").is_file():
            parser.error(f"{args.calib} holds no manifest.jsonl")
    return run_or_show(args, measure, show)


if __name__ == "__main__":
    sys.exit(main())
