"""Peak resident memory and wall time of `sfc build` against the number of calibration clips.

Run from the repository root::

    python benchmarks/build_memory.py                              # tiny.en: 25, 100, 150 clips
    python benchmarks/build_memory.py --model whisper-base --limits 100 --eval-limit 50
    python benchmarks/build_memory.py --show                       # print the saved table
    python benchmarks/build_memory.py --model whisper-base --limits 25 --eval-limit 10 --trace

Each build is the command a user runs (`sfc build MODEL --calib DATA --calib-limit N`: ESC
W8A8, the WER check included unless `--eval-limit` shortens it), one fresh process after
another, never two at once. Its peak resident set size is the kernel's own count for that
process (`os.wait4`'s ru_maxrss: the child is a fresh exec of a small parent), next to the
peak the build writes in its report.md; the wall time is the whole command's, and
`build_s` (the report's) leaves the WER check out. The calibration clips default to
`../shared/datasets/speech-calib` (150 clips; the repository bundles 100 of them).
Builds land under `--work` (outside the repository), and are deleted unless `--keep`.
Results go to `benchmarks/results/build_memory.json` (whisper-tiny.en) or
`build_memory_<model>.json` (`build_memory_base.json` for whisper-base).

`--trace`: the build runs in-process under a sampler that reads its resident memory every
0.1 s and, at each new peak (20 MiB above the last), records the build's Python stack; the
samples go to `<work>/<model>-n<N>.trace.json` and the table names the frames of the
highest. This is how the peak's phase and holder were found (BENCHMARKS.md, issue 13).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from common import machine_info, machine_line, outside_repo, print_table, run_or_show

REPO = Path(__file__).resolve().parents[1]
SHARED_CALIB = REPO.parent / "shared" / "datasets" / "speech-calib"
RESULTS = REPO / "benchmarks" / "results"
TRACE_STEP_MIB = 20  # a new peak is recorded when the RSS passes the last one by this much
TRACED_CHILD = "--traced-child"  # argv[1] of a traced build process (see `traced_build`)
# Folders of sfc's modules, as `_sample_peaks` names frames (package folder/file).
SFC_DIRS = {"compiler", "calib", "precision", "quant", "runtime", "targets", "eval", "models"}


def default_json(model: str) -> Path:
    """Where a model's table is saved (tiny.en keeps the original name)."""
    if model == "whisper-tiny.en":
        return RESULTS / "build_memory.json"
    return RESULTS / f"build_memory_{model.removeprefix('whisper-')}.json"


def _rss_mib() -> int:
    """This process's resident set now (Linux: VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def _sample_peaks(thread: int, start: float, peaks: list[dict[str, Any]],
                  stop: threading.Event) -> None:
    """Append {t, rss_mib, stack} each time the RSS passes the last peak by TRACE_STEP_MIB;
    `stack`: the frames of thread `thread` (the build's), outermost first."""
    last = 0
    while not stop.wait(0.1):
        rss = _rss_mib()
        if rss < last + TRACE_STEP_MIB:
            continue
        last = rss
        frame = sys._current_frames().get(thread)
        stack = [] if frame is None else [f"{Path(f.filename).parent.name}/"
                                          f"{Path(f.filename).name}:{f.lineno}:{f.name}"
                                          for f in traceback.extract_stack(frame)]
        peaks.append({"t": round(time.perf_counter() - start, 1), "rss_mib": rss,
                      "stack": stack})


def traced_build(trace: Path, sfc_args: list[str]) -> int:
    """Run `sfc <sfc_args>` in this process under the peak sampler; write its samples."""
    from sfc.cli import app

    peaks: list[dict[str, Any]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_peaks, daemon=True, args=(
        threading.get_ident(), time.perf_counter(), peaks, stop))
    sampler.start()
    sys.argv = ["sfc", *sfc_args]
    try:
        app()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    else:
        code = 0
    finally:
        stop.set()
        sampler.join()
        trace.write_text(json.dumps(peaks, indent=1) + "\n")
    return code


def peak_frames(trace: Path, depth: int = 2) -> str:
    """The innermost `depth` sfc frames of a trace's highest sample."""
    peaks = json.loads(trace.read_text())
    if not peaks:
        return "-"
    top = max(peaks, key=lambda p: p["rss_mib"])
    ours = [f for f in top["stack"] if f.split("/")[0] in SFC_DIRS]
    return " < ".join(reversed(ours[-depth:])) or top["stack"][-1]


def build_command(model: str, out: Path, calib: Path, limit: int,
                  eval_limit: int | None, threads: int | None,
                  trace: Path | None = None) -> list[str]:
    """The `sfc build` command line of one measured build (`trace`: run it under the
    peak sampler, its samples written there)."""
    launcher = ["-m", "sfc.cli"] if trace is None else [__file__, TRACED_CHILD, str(trace)]
    cmd = [sys.executable, *launcher, "build", model, "-o", str(out),
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
        trace = work / f"{args.model}-n{limit}.trace.json" if args.trace else None
        cmd = build_command(args.model, out, args.calib, limit, args.eval_limit, args.threads,
                            trace)
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
                     "lossless": wer.get("lossless"),
                     "peak_at": None if trace is None else peak_frames(trace)})
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
    for r in result["rows"]:
        if r.get("peak_at"):
            print(f"{r['calib_clips']} clips: peak in {r['peak_at']}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [TRACED_CHILD]:
        return traced_build(Path(argv[1]), argv[2:])
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
    parser.add_argument("--trace", action="store_true",
                        help="record the Python stack at each new RSS peak (see the doc)")
    parser.add_argument("--json", type=Path, default=None,
                        help="results file (default: build_memory[_<model>].json)")
    parser.add_argument("--show", action="store_true", help="print the saved report")
    args = parser.parse_args(argv)
    args.json = args.json or default_json(args.model)
    if not args.show:
        args.work = outside_repo(parser, args.work, REPO)
        args.work.mkdir(parents=True, exist_ok=True)
        if not (args.calib / "manifest.jsonl").is_file():
            parser.error(f"{args.calib} holds no manifest.jsonl")
    return run_or_show(args, measure, show)


if __name__ == "__main__":
    sys.exit(main())
