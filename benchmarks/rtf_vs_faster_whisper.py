"""Real-time factor of sfc's ONNX Runtime Whisper runtime against faster-whisper, side by side.

Run from the repository root::

    python benchmarks/rtf_vs_faster_whisper.py                  # 60 files, 3 rounds, 2 threads
    python benchmarks/rtf_vs_faster_whisper.py --limit 20 --rounds 5 --threads 1

What it measures: RTF = compute seconds / audio seconds (lower is faster) of whisper-tiny.en,
greedy decoding without timestamps, on the first ``--limit`` utterances of an evaluation
manifest, for three variants:

* ``sfc-ort-fp32``        sfc's PyTorch-free runtime (`WhisperRuntime`) on the FP32 export;
* ``faster-whisper-fp32`` faster-whisper / CTranslate2, ``compute_type="float32"``;
* ``faster-whisper-int8`` faster-whisper / CTranslate2, ``compute_type="int8"``.

Method (CPU timings on a shared machine drift by tens of percent between runs):

* every variant runs in its own fresh subprocess (this script re-invoked with the hidden
  ``--worker VARIANT`` flag), so no variant inherits another's threads, caches or allocator;
* variants are interleaved in rounds (A B C, A B C, ...), so slow drift hits all of them;
* a worker loads its model and all audio (not timed), transcribes the first file once as a
  warm-up (not timed), then times only the transcription calls with `time.perf_counter`;
  every variant gets the same float32 16 kHz arrays from `sfc.runtime.audio.load_audio`
  (their checksum is compared across workers);
* the report gives, per variant, the median RTF over rounds (with min/max), the ratio to
  sfc as the median of per-round ratios (>1 means slower than sfc), per-file latency
  p50/p90 (each file's median over rounds), corpus WER after normalisation, and how many
  files' normalised hypotheses equal sfc's.

The JSON report (default ``benchmarks/results/rtf_vs_faster_whisper.json``) holds the
machine description, the command, every round's per-file timings and the summaries.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    faster_whisper_model,
    faster_whisper_transcriber,
    machine_info,
    machine_line,
    print_table,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "calibration_data" / "eval"
DEFAULT_JSON = REPO / "benchmarks" / "results" / "rtf_vs_faster_whisper.json"
SFC_MODEL = "whisper-tiny.en"
SAMPLE_RATE = 16000

SFC = "sfc-ort-fp32"
FW_FP32 = "faster-whisper-fp32"
FW_INT8 = "faster-whisper-int8"
VARIANTS: tuple[str, ...] = (SFC, FW_FP32, FW_INT8)

# Workers print exactly one line starting with this marker; libraries may print others.
RESULT_MARKER = "RTF_RESULT "

Transcriber = Callable[[np.ndarray], str]


# ----------------------------------------------------------------------------- worker side


def _load_sfc(threads: int) -> Transcriber:
    from sfc.models import model_folder
    from sfc.runtime.whisper import WhisperRuntime

    rt = WhisperRuntime.open(model_folder(SFC_MODEL), threads=threads)
    return rt.transcribe


def _load_faster_whisper(compute_type: str, threads: int) -> Transcriber:
    return faster_whisper_transcriber(faster_whisper_model(compute_type, threads))

def _load_variant(variant: str, threads: int) -> Transcriber:
    if variant == SFC:
        return _load_sfc(threads)
    if variant == FW_FP32:
        return _load_faster_whisper("float32", threads)
    if variant == FW_INT8:
        return _load_faster_whisper("int8", threads)
    raise ValueError(f"unknown variant {variant!r}")


def _select(data: Path, limit: int) -> list[Any]:
    from sfc.eval.manifest import read_manifest

    utterances = read_manifest(data)
    return utterances[:limit] if limit > 0 else utterances


def run_worker(variant: str, data: Path, limit: int, threads: int) -> None:
    """Load, warm up, time the transcriptions and print one marked JSON line."""
    from sfc.runtime.audio import load_audio

    utterances = _select(data, limit)
    audios = [load_audio(u.audio) for u in utterances]
    digest = hashlib.sha256()
    for a in audios:
        digest.update(a.tobytes())

    t0 = time.perf_counter()
    transcribe = _load_variant(variant, threads)
    load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    transcribe(audios[0])
    warmup_s = time.perf_counter() - t0

    compute_s: list[float] = []
    hyps: list[str] = []
    for audio in audios:
        start = time.perf_counter()
        text = transcribe(audio)
        compute_s.append(time.perf_counter() - start)
        hyps.append(text)

    result = {
        "variant": variant,
        "pid": os.getpid(),
        "load_s": load_s,
        "warmup_s": warmup_s,
        "audio_sha256": digest.hexdigest(),
        "ids": [u.id for u in utterances],
        "audio_s": [len(a) / SAMPLE_RATE for a in audios],
        "compute_s": compute_s,
        "hyps": hyps,
    }
    sys.stdout.write(RESULT_MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------- parent side


def spawn_worker(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one variant in a fresh interpreter and return its parsed result."""
    cmd = [
        sys.executable, str(Path(__file__).resolve()),
        "--worker", variant,
        "--data", str(args.data),
        "--limit", str(args.limit),
        "--threads", str(args.threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
        raise RuntimeError(f"worker {variant} failed (exit {proc.returncode}):\n{tail}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            result: dict[str, Any] = json.loads(line[len(RESULT_MARKER):])
            return result
    raise RuntimeError(f"worker {variant} printed no result line:\n{proc.stdout[-2000:]}")


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def _rtf(run: dict[str, Any]) -> float:
    return float(sum(run["compute_s"]) / sum(run["audio_s"]))


def summarize(
    rounds: list[dict[str, dict[str, Any]]], references: list[str]
) -> dict[str, dict[str, Any]]:
    """Per-variant RTF, ratio to sfc, latency percentiles, WER and agreement with sfc."""
    from sfc.eval.normalize import normalize_text
    from sfc.eval.wer import corpus_wer, count_errors

    sfc_norm = [normalize_text(h) for h in rounds[0][SFC]["hyps"]]
    summary: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        runs = [r[variant] for r in rounds]
        rtfs = [_rtf(run) for run in runs]
        ratios = [_rtf(r[variant]) / _rtf(r[SFC]) for r in rounds]
        per_file = [statistics.median(ts) for ts in zip(*(run["compute_s"] for run in runs),
                                                        strict=True)]
        hyps = runs[0]["hyps"]
        norm = [normalize_text(h) for h in hyps]
        stable = sum(
            all(normalize_text(run["hyps"][i]) == norm[i] for run in runs[1:])
            for i in range(len(hyps))
        )
        summary[variant] = {
            "rtf_median": statistics.median(rtfs),
            "rtf_min": min(rtfs),
            "rtf_max": max(rtfs),
            "rtf_per_round": rtfs,
            "ratio_to_sfc_median": statistics.median(ratios),
            "ratio_to_sfc_per_round": ratios,
            "latency_p50_s": _percentile(per_file, 50),
            "latency_p90_s": _percentile(per_file, 90),
            "wer": corpus_wer([count_errors(ref, h) for ref, h in zip(references, hyps,
                                                                      strict=True)]),
            "same_as_sfc": sum(a == b for a, b in zip(norm, sfc_norm, strict=True)),
            "stable_across_rounds": stable,
            "load_s_median": statistics.median(run["load_s"] for run in runs),
            "warmup_s_median": statistics.median(run["warmup_s"] for run in runs),
        }
    return summary


def _rows(summary: dict[str, dict[str, Any]], n_files: int) -> list[list[str]]:
    rows = []
    for variant in VARIANTS:
        s = summary[variant]
        rows.append([
            variant,
            f"{s['rtf_median']:.4f}",
            f"{s['rtf_min']:.4f} / {s['rtf_max']:.4f}",
            f"{s['ratio_to_sfc_median']:.2f}x",
            f"{s['latency_p50_s'] * 1000:.0f}",
            f"{s['latency_p90_s'] * 1000:.0f}",
            f"{s['wer'] * 100:.2f}%",
            f"{s['same_as_sfc']}/{n_files}",
        ])
    return rows


HEADERS = ["variant", "RTF median", "RTF min / max", "vs sfc", "p50 ms", "p90 ms", "WER",
           "same as sfc"]


def show_table(summary: dict[str, dict[str, Any]], n_files: int, title: str) -> None:
    print_table(title, HEADERS, _rows(summary, n_files), width=120)


def run_parent(args: argparse.Namespace) -> int:
    from sfc.atomic import write_json_atomic
    from sfc.models import model_folder

    command = shlex.join(["python", *sys.argv])
    machine = machine_info(args.threads)
    line = machine_line(machine)
    print(line)
    print(f"command: {command}")

    folder = model_folder(SFC_MODEL)  # export once here, so no worker pays for it
    utterances = _select(args.data, args.limit)
    references = [u.text for u in utterances]
    print(f"sfc model: {folder}")
    print(f"data: {args.data} ({len(utterances)} files); rounds: {args.rounds}; "
          f"order per round: {' '.join(VARIANTS)}", flush=True)

    rounds: list[dict[str, dict[str, Any]]] = []
    for n in range(1, args.rounds + 1):
        results: dict[str, dict[str, Any]] = {}
        for variant in VARIANTS:
            run = spawn_worker(variant, args)
            results[variant] = run
            print(f"  round {n}/{args.rounds} {variant:<20} RTF {_rtf(run):.4f} "
                  f"(load {run['load_s']:.1f} s, warm-up {run['warmup_s']:.2f} s, "
                  f"compute {sum(run['compute_s']):.1f} s)", flush=True)
        rounds.append(results)

    digests = {r[v]["audio_sha256"] for r in rounds for v in VARIANTS}
    if len(digests) != 1:
        raise RuntimeError("workers saw different audio arrays; the comparison is invalid")

    audio_total = sum(rounds[0][SFC]["audio_s"])
    summary = summarize(rounds, references)
    title = (f"whisper-tiny.en RTF, {len(utterances)} files ({audio_total:.1f} s audio), "
             f"{args.rounds} rounds, {args.threads} threads")
    print()
    show_table(summary, len(utterances), title)
    print("RTF = compute s / audio s (median over rounds); vs sfc = median of per-round "
          "RTF ratios (>1 slower than sfc);\np50/p90 = per-file latency (each file's median "
          "over rounds); WER normalised, round 1; same as sfc = normalised hypothesis "
          "equal to sfc's.")
    unstable = {v: s["stable_across_rounds"] for v, s in summary.items()
                if s["stable_across_rounds"] != len(utterances)}
    if unstable:
        print(f"note: hypotheses changed between rounds for some files: {unstable}")
    print(line)
    print(f"command: {command}")

    report = {
        "description": "RTF of sfc's ORT Whisper runtime vs faster-whisper (CTranslate2)",
        "command": command,
        "machine": machine,
        "model": SFC_MODEL,
        "sfc_folder": str(folder),
        "data": str(args.data),
        "limit": args.limit,
        "rounds": args.rounds,
        "threads": args.threads,
        "variants": list(VARIANTS),
        "n_files": len(utterances),
        "audio_s_total": audio_total,
        "audio_sha256": digests.pop(),
        "summary": summary,
        "runs": [
            {v: {k: r[v][k] for k in ("pid", "load_s", "warmup_s", "compute_s", "hyps")}
             for v in VARIANTS}
            for r in rounds
        ],
        "ids": rounds[0][SFC]["ids"],
        "references": references,
        "audio_s": rounds[0][SFC]["audio_s"],
    }
    write_json_atomic(args.json, report)
    print(f"wrote {args.json}")
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="manifest folder or manifest.jsonl (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=60,
                        help="use the first N utterances of the manifest; 0 = all "
                             "(default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of all variants (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2,
                        help="intra-op threads for every variant (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON,
                        help="where to write the JSON report (default: %(default)s)")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.limit < 0:
        parser.error("--limit must be 0 (all) or positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker, args.data, args.limit, args.threads)
        return 0
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
