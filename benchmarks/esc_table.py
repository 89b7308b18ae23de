"""The ESC paper's table on whisper-tiny.en: WER of max / percentile / MSE / ESC calibration at
W8A8, W4A8 and W8A4, every Linear/Conv input quantized (fc2 included).

Run from the repository root::

    python benchmarks/esc_table.py                      # 12 builds, about 70 min on 2 cores
    python benchmarks/esc_table.py --configs W8A4 --calibrators max,esc --eval-limit 20 \\
        --calib-limit 8 --esc-budget 8                  # smoke test

Method:

* Every variant is ``sfc build --target sim`` through ``sfc.pipeline.compile_model``: the
  QDQ graph run by ONNX Runtime as fake quantization at ORT's basic optimisation level, so
  the Q/DQ nodes are exactly the numerics measured. No CPU kernel runs 4-bit activations
  or W4 weights together with quantized activations, hence the simulation; at W8A8 the
  ``ort-cpu`` integer-kernel numbers are in ``quant_variants.py``'s table.
* Weights: INT8 per-channel, or INT4 block-wise (block 32, MSE-chosen scales). Activations:
  per-tensor symmetric INT8 or INT4 on the inputs of every weighted op. Calibration: the
  bundled 100 calibration utterances; ESC: budget 100, 16 objective utterances (the
  defaults), seed 0.
* WER on all 350 ``calibration_data/eval`` utterances, Whisper normaliser; ΔWER against
  the FP32 export with the paired bootstrap 95% interval (seed 0); "lossless" = 0 inside it.

The JSON report (default ``benchmarks/results/esc_table.json``) holds the machine, the
command, every variant's WER comparison, per-utterance hypotheses and errors, and the ESC
searches (objective start / final / best, evaluations, seconds). It is rewritten after each
variant; ``--resume`` keeps the variants it already holds.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    build_variant,
    eval_summary,
    machine_info,
    machine_line,
    outside_repo,
    print_table,
    run_or_show,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "calibration_data" / "eval"
DEFAULT_JSON = REPO / "benchmarks" / "results" / "esc_table.json"
DEFAULT_WORK = Path("/tmp/sfc-esc-table")
MODEL = "whisper-tiny.en"
CONFIGS: dict[str, tuple[int, int]] = {"W8A8": (8, 8), "W4A8": (4, 8), "W8A4": (8, 4),
                                       "W4A4": (4, 4)}
CALIBRATORS = ("max", "percentile", "mse", "esc")


def variant_name(config: str, calibrator: str) -> str:
    """Folder and JSON key of one cell of the table."""
    return f"{config.lower()}-{calibrator}"


def _cell(result: dict[str, Any] | None) -> str:
    if result is None:
        return "-"
    if result.get("status") != "ok":
        return "FAILED"
    w = result["wer"]
    mark = " ✓" if w["lossless"] else ""
    return (f"{100 * w['wer']:.2f} ({100 * w['delta']:+.2f} [{100 * w['delta_lo']:+.2f}, "
            f"{100 * w['delta_hi']:+.2f}]){mark}")


def loops(result: dict[str, Any], ref_words: Sequence[int]) -> np.ndarray:
    """Mask of the utterances whose greedy decode fell into a repetition loop: the decoder's
    loop guard ended it, or (a loop it does not catch) more words were inserted than the
    reference has.

    Even when ended by the guard, a handful of loops can decide a corpus WER, so the table
    also compares the calibrators on the utterances none of them looped on.
    """
    looped = np.array(result.get("loop_stops", [0] * len(ref_words))) > 0
    return looped | (np.array(result["insertions"]) > np.array(ref_words))


def _ok(results: dict[str, dict[str, Any]], config: str) -> dict[str, dict[str, Any]]:
    out = {}
    for cal in CALIBRATORS:
        r = results.get(variant_name(config, cal))
        if r is not None and r.get("status") == "ok":
            out[cal] = r
    return out


def common_wer(results: dict[str, dict[str, Any]], config: str,
               ref_words: Sequence[int]) -> tuple[int, dict[str, float]]:
    """(utterances excluded, calibrator -> WER %) over the utterances on which no
    calibrator of `config` ran away: the same utterances for every calibrator."""
    done = _ok(results, config)
    ref = np.array(ref_words)
    bad = np.zeros(len(ref), dtype=bool)
    for r in done.values():
        bad |= loops(r, ref_words)
    keep = ~bad
    return int(bad.sum()), {cal: float(100 * np.array(r["errors"])[keep].sum()
                                       / ref[keep].sum()) for cal, r in done.items()}


def _checks(results: dict[str, dict[str, Any]], configs: Sequence[str],
            ref_words: Sequence[int]) -> list[str]:
    """The issue's targets, each stated with the numbers that decide it."""
    lines = []
    if "W8A8" in configs:
        esc, mx = (results.get(variant_name("W8A8", c)) for c in ("esc", "max"))
        if esc and mx and esc.get("status") == mx.get("status") == "ok":
            lines.append(f"W8A8: ESC lossless = {esc['wer']['lossless']}, "
                         f"max lossless = {mx['wer']['lossless']}")
    for config in configs:
        done = _ok(results, config)
        if config == "W8A8" or not {"esc", "mse", "max"} <= set(done):
            continue
        corpus = {c: 100 * float(done[c]["wer"]["wer"]) for c in ("esc", "mse", "max")}
        excluded, common = common_wer(results, config, ref_words)
        for label, w in (("corpus WER", corpus),
                         (f"WER without the {excluded} looping utterances", common)):
            e, m, x = w["esc"], w["mse"], w["max"]
            lines.append(f"{config}, {label}: ESC {e:.2f} <= MSE {m:.2f} <= max {x:.2f}: "
                         f"{e <= m <= x}")
    return lines


def show(report: dict[str, Any]) -> None:
    """Print the table (rows: calibrators, columns: bit-width configurations)."""
    results, configs = report["results"], report["configs"]
    fp32 = report["fp32"]
    rows = [["FP32", *(f"{100 * fp32['wer']:.2f} [{100 * fp32['ci_lo']:.2f}, "
                       f"{100 * fp32['ci_hi']:.2f}]" for _ in configs)]]
    for cal in report["calibrators"]:
        rows.append([cal, *(_cell(results.get(variant_name(c, cal))) for c in configs)])
    caption = "\n".join([
        f"WER % on {fp32['n']} utterances of {Path(report['data']).name}; in brackets ΔWER "
        "vs FP32 in points with its paired bootstrap 95% CI; ✓ = lossless (0 inside the CI).",
        "Fake quantization (sfc build --target sim): every Linear/Conv input quantized, "
        "fc2 included; attention products float.",
    ])
    print_table(f"{MODEL}: calibrators x bit-widths", ["calibrator", *configs], rows, caption)
    ref_words = report["ref_words"]
    rows = []
    for c in configs:
        excluded, common = common_wer(results, c, ref_words)
        for cal, w in common.items():
            n_run = int(loops(results[variant_name(c, cal)], ref_words).sum())
            rows.append([f"{c} {cal}", str(n_run), f"{w:.2f}", str(excluded)])
    print_table("Repetition loops (ended by the loop guard, or more insertions than words)",
                ["variant", "loops", "WER % on the common rest", "excluded in config"],
                rows)
    esc_rows = []
    for c in configs:
        r = results.get(variant_name(c, "esc"))
        if r and r.get("status") == "ok" and r.get("esc"):
            e = r["esc"]
            esc_rows.append([c, f"{e['start_objective']:.4f}", f"{e['final_objective']:.4f}",
                             f"{e['best_objective']:.4f}", str(e["evaluations"]),
                             f"{e['seconds']:.0f}", f"{r['build_s']:.0f}"])
    if esc_rows:
        print_table("ESC searches", ["config", "objective MSE start", "final (mean)", "best",
                                     "evaluations", "ESC s", "build s"], esc_rows)
    for line in _checks(results, configs, ref_words):
        print(line)


def run(args: argparse.Namespace) -> int:
    from sfc.atomic import write_json_atomic
    from sfc.eval import evaluate, read_manifest
    from sfc.models import model_folder
    from sfc.report import fp32_eval
    from sfc.runtime.whisper import WhisperRuntime

    command = shlex.join(["python", *sys.argv])
    machine = machine_info(args.threads)
    print(machine_line(machine))
    print(f"command: {command}", flush=True)
    fp32_folder = model_folder(MODEL)
    utterances = read_manifest(args.data)[: args.eval_limit]

    def run_fp32() -> Any:
        rt = WhisperRuntime.open(fp32_folder, threads=args.threads)
        return evaluate(rt.transcribe, utterances, model=f"{MODEL} fp32", data=str(args.data))

    fp32 = fp32_eval(fp32_folder, args.data, args.eval_limit, run_fp32)
    results: dict[str, dict[str, Any]] = {}
    if args.resume and args.json.is_file():
        import json

        old = json.loads(args.json.read_text())
        results = {k: v for k, v in old.get("results", {}).items() if v.get("status") == "ok"}
    report: dict[str, Any] = {
        "description": "ESC paper table: calibrators x bit-widths, fake quantization",
        "command": command, "machine": machine, "model": MODEL, "data": str(args.data),
        "eval_limit": args.eval_limit, "calib_limit": args.calib_limit,
        # Kept variants stay in the table next to the requested ones.
        "configs": [c for c in CONFIGS if c in args.configs
                    or any(variant_name(c, k) in results for k in CALIBRATORS)],
        "calibrators": [k for k in CALIBRATORS if k in args.calibrators
                        or any(variant_name(c, k) in results for c in CONFIGS)],
        "fp32": eval_summary(fp32), "ref_words": [u.ref_words for u in fp32.utterances],
        "results": results,
    }
    started = time.perf_counter()
    for config in args.configs:
        weights, activations = CONFIGS[config]
        for cal in args.calibrators:
            name = variant_name(config, cal)
            if name in results:
                print(f"== {name}: kept from {args.json}")
                continue
            print(f"\n== {name}", flush=True)
            # The published table used MSE-clipped INT4 weights (before GPTQ existed).
            kwargs: dict[str, Any] = {"target": "sim", "weights": weights,
                                      "activations": activations, "calibrator": cal,
                                      "weight_method": "mse"}
            if cal == "esc":
                kwargs["esc_budget"] = args.esc_budget
            try:
                res = build_variant(MODEL, args.work / name, kwargs, args.data,
                                    calib_limit=args.calib_limit, eval_limit=args.eval_limit,
                                    threads=args.threads)
            except Exception as exc:  # one variant failing must not stop the others
                results[name] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                                 "traceback": traceback.format_exc()}
                print(f"{name} FAILED: {exc}", flush=True)
            else:
                results[name] = {"status": "ok", **res}
                print(f"{name}: {_cell(results[name])}, build {res['build_s']:.0f} s, "
                      f"build+eval {res['build_and_eval_s']:.0f} s", flush=True)
            write_json_atomic(args.json, report)
    report["total_s"] = time.perf_counter() - started
    write_json_atomic(args.json, report)
    print()
    show(report)
    print(machine_line(machine))
    print(f"command: {command}\nwrote {args.json}")
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--calib-limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--esc-budget", type=int, default=100)
    parser.add_argument("--configs", default="W8A8,W4A8,W8A4",
                        help=f"comma-separated subset of {', '.join(CONFIGS)}")
    parser.add_argument("--calibrators", default=",".join(CALIBRATORS),
                        help=f"comma-separated subset of {', '.join(CALIBRATORS)}")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--resume", action="store_true",
                        help="keep the variants the JSON report already holds")
    parser.add_argument("--show", action="store_true", help="only print the saved report")
    args = parser.parse_args(argv)
    args.configs = [c.strip().upper() for c in args.configs.split(",") if c.strip()]
    args.calibrators = [c.strip() for c in args.calibrators.split(",") if c.strip()]
    bad = [c for c in args.configs if c not in CONFIGS]
    bad += [c for c in args.calibrators if c not in CALIBRATORS]
    if bad:
        parser.error(f"unknown config or calibrator: {', '.join(bad)}")
    args.work = outside_repo(parser, args.work, REPO)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_or_show(parse_args(argv), run, show)


if __name__ == "__main__":
    sys.exit(main())
