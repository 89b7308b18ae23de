"""Speed, WER and memory of sfc's ONNX Runtime Whisper runtime against faster-whisper.

Run from the repository root::

    python benchmarks/rtf_vs_faster_whisper.py                  # 60 files, 3 rounds, 2 threads
    python benchmarks/rtf_vs_faster_whisper.py --limit 0 --threads 1 --sfc-build w8a8=build
    python benchmarks/rtf_vs_faster_whisper.py --limit 0 --batch 8 --sfc-build w8a8=build

What it measures, for whisper-tiny.en, greedy decoding without timestamps, on the first
``--limit`` utterances of an evaluation manifest (0: all of them):

* ``sfc-ort-fp32``        sfc's PyTorch-free runtime (`WhisperRuntime`) on the FP32 export;
* ``sfc-LABEL``           the same runtime on a build folder (``--sfc-build LABEL=FOLDER``,
  repeatable);
* ``faster-whisper-fp32`` faster-whisper / CTranslate2, ``compute_type="float32"``;
* ``faster-whisper-int8`` faster-whisper / CTranslate2, ``compute_type="int8"``, the
  reference for the speed ratio and the first WER difference.

Two modes (``--batch N``; the table title and the JSON's ``mode`` say which ran):

* latency (N = 1, the default): one call per file. sfc: `WhisperRuntime.transcribe`;
  faster-whisper: `WhisperModel.transcribe`. Speed is the RTF = compute s / audio s (lower
  is faster); p50/p90 are per-file latencies.
* throughput (N > 1): one call per N consecutive files. sfc: `transcribe_many` (the windows
  of the N files decoded as one batch; `max_batch` set to N); faster-whisper:
  `BatchedInferencePipeline(model).transcribe(audio, batch_size=N)` per file, which batches
  the 30 s chunks of one file only. With ``vad_filter=False`` it accepts a clip under 30 s as
  one chunk and refuses a longer one unless ``clip_timestamps`` are given; the script gives
  consecutive 30 s spans, which is the pipeline's unbatched decoder's windowing. So on clips
  under 30 s (all of calibration_data/eval) it runs one chunk per file and batching cannot
  help it; it is there because it is faster-whisper's documented batched API. faster-whisper's
  strongest cross-file batching is the third variant, ``ct2-int8-batchN``: the int8
  CTranslate2 model underneath (`WhisperModel.encode`, then `WhisperModel.model.generate`)
  on the windows of N files at once, with faster-whisper's own features (its
  `FeatureExtractor`, last frame dropped, 30 s windows zero-padded in log-mel space, as its
  `generate_segments` does), its prompt without timestamps (`get_prompt`:
  ``<|startoftranscript|><|notimestamps|>`` on tiny.en) and its suppressed tokens
  (`get_suppressed_tokens(tokenizer, [-1])`), greedy (``beam_size=1``), ``max_length`` 448,
  no temperature fallback and no no-speech skipping (sfc has neither). Speed is the
  throughput = audio s / compute s (higher is faster); p50/p90 are per-call latencies.

Method (CPU timings on a shared machine drift by tens of percent between runs):

* every variant runs in its own fresh subprocess (this script re-invoked with the hidden
  ``--worker VARIANT`` flag), so no variant inherits another's threads, caches or allocator;
* variants are interleaved in rounds (A B C, A B C, ...), so slow drift hits all of them;
* a worker loads its model and all audio (not timed), transcribes the first call's files once
  as a warm-up (not timed), then times only the transcription calls, back to back, with
  `time.perf_counter`; every variant gets the same float32 16 kHz arrays from
  `sfc.runtime.audio.load_audio` (their checksum is compared across workers);
* the worker's peak resident memory (`sfc.memory.peak_rss_kib`, VmHWM) is read when it ends:
  the whole process, its imports and all the loaded audio (about 64 kB per second of audio)
  included, so it compares variants rather than measuring a runtime alone; the table gives
  the largest over rounds;
* the report gives, per variant, the speed (median over rounds, with min/max), the speed
  ratio to faster-whisper-int8 as the median of per-round ratios of total compute time
  (faster-whisper-int8's / this variant's: >1 means this variant is faster), p50/p90
  latency (each call's median over rounds), corpus WER after Whisper's English normalisation
  (round 1), the WER difference to faster-whisper-int8 and to sfc-ort-fp32 with a paired
  95% bootstrap interval over utterances (`sfc.eval.wer.paired_bootstrap_delta`, seed and
  resamples in the JSON), how many files' normalised hypotheses equal sfc-ort-fp32's, and
  the peak RSS.

The JSON report (default ``benchmarks/results/rtf_vs_faster_whisper_t{threads}.json``, or
``..._batch{N}_t{threads}.json`` in throughput mode) holds the machine description, the
command, every round's per-call timings, hypotheses and peak RSS, per-utterance errors and
the summaries.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    faster_whisper_model,
    faster_whisper_transcriber,
    machine_info,
    machine_line,
    print_table,
    run_marked_worker,
)

from sfc.eval.wer import PairedDelta

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "calibration_data" / "eval"
RESULTS = REPO / "benchmarks" / "results"
SFC_MODEL = "whisper-tiny.en"
SAMPLE_RATE = 16000
CHUNK_S = 30  # Whisper's window, seconds

SFC = "sfc-ort-fp32"
FW_FP32 = "faster-whisper-fp32"
FW_INT8 = "faster-whisper-int8"
SFC_PREFIX = "sfc-"
SPIN = "+spin"  # the sfc runtime with ORT's spinning threads (`--sfc-spin`)
WINDOW = "+window"  # the sfc runtime with `--sfc-window`'s encoder window
CT2_PREFIX = "ct2-int8-batch"
# The WER differences the report gives: every variant minus each of these.
DELTA_REFERENCES = (FW_INT8, SFC)
BOOTSTRAP_SEED = 0
BOOTSTRAP_RESAMPLES = 2000
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

# Workers print exactly one line starting with this marker; libraries may print others.
RESULT_MARKER = "RTF_RESULT "

# Every variant transcribes one call's recordings (one file in latency mode, N in
# throughput mode) and returns one text per recording.
Transcriber = Callable[[Sequence[np.ndarray]], list[str]]


# ----------------------------------------------------------------------------- pure helpers


def parse_build(spec: str) -> tuple[str, Path]:
    """``LABEL=FOLDER`` of ``--sfc-build``: a label safe in a variant name, a model folder."""
    label, sep, folder = spec.partition("=")
    if not sep or not folder:
        raise argparse.ArgumentTypeError(f"expected LABEL=FOLDER, got {spec!r}")
    if not LABEL.fullmatch(label):
        raise argparse.ArgumentTypeError(
            f"label {label!r}: use letters, digits, '_', '.', '-' (not first)")
    path = Path(folder).resolve()
    if not (path / "card.json").is_file():
        raise argparse.ArgumentTypeError(f"{path} has no card.json: not an sfc model folder")
    return label, path


def variant_names(builds: Sequence[str], batch: int, spin: bool = False,
                  window: bool = False) -> tuple[str, ...]:
    """The variants one round runs, in order: sfc first, then faster-whisper; with `spin`,
    each sfc variant again with ORT's idle threads spinning (``<variant>+spin``); with
    `window`, again with `--sfc-window`'s encoder window (``<variant>+window``)."""
    sfc = [SFC, *(SFC_PREFIX + label for label in builds)]
    names = [*sfc, *(name + SPIN for name in sfc if spin),
             *(name + WINDOW for name in sfc if window), FW_FP32, FW_INT8]
    if batch > 1:
        names.append(f"{CT2_PREFIX}{batch}")
    return tuple(names)


def default_json(batch: int, threads: int) -> Path:
    """Where a run's JSON goes by default: one file per mode and thread count."""
    mode = f"_batch{batch}" if batch > 1 else ""
    return RESULTS / f"rtf_vs_faster_whisper{mode}_t{threads}.json"


def chunks(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most `size` items covering range(n)."""
    return (slice(i, min(i + size, n)) for i in range(0, n, size))


def fixed_clips(duration_s: float, chunk_s: float = CHUNK_S) -> list[dict[str, float]]:
    """Consecutive `chunk_s` spans covering the audio, as `clip_timestamps` (seconds)."""
    starts = np.arange(0.0, duration_s, chunk_s)
    return [{"start": float(s), "end": float(min(s + chunk_s, duration_s))} for s in starts]


def feature_windows(features: np.ndarray, frames: int) -> np.ndarray:
    """[n_mels, T] log-mel cut into [W, n_mels, frames] windows, the last zero-padded.

    At least one window, so silence still gets one decode (as faster-whisper does).
    """
    n_mels, total = features.shape
    n = max(1, -(-total // frames))
    out = np.zeros((n, n_mels, frames), dtype=np.float32)
    for i in range(n):
        seg = features[:, i * frames:(i + 1) * frames]
        out[i, :, :seg.shape[1]] = seg
    return out


def regroup(texts: Sequence[str], counts: Sequence[int]) -> list[str]:
    """Per-window texts joined per recording (`counts` windows each), with a space."""
    if sum(counts) != len(texts):
        raise ValueError(f"{len(texts)} texts for {sum(counts)} windows")
    out, start = [], 0
    for n in counts:
        out.append(" ".join(t for t in texts[start:start + n] if t))
        start += n
    return out


def speed_ratios(ref_runs: Sequence[Mapping[str, Any]],
                 runs: Sequence[Mapping[str, Any]]) -> list[float]:
    """Per round: the reference's total compute time / this variant's (>1: this is faster)."""
    return [sum(r["compute_s"]) / sum(v["compute_s"]) for r, v in zip(ref_runs, runs,
                                                                        strict=True)]


def paired_deltas(errors: Mapping[str, Sequence[int]], ref_words: Sequence[int],
                  reference: str, *, seed: int = BOOTSTRAP_SEED,
                  n_resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, PairedDelta]:
    """Each variant's WER minus the reference's, paired bootstrap over utterances."""
    from sfc.eval.wer import paired_bootstrap_delta

    return {v: paired_bootstrap_delta(errors[reference], e, ref_words, seed=seed,
                                      n_resamples=n_resamples)
            for v, e in errors.items()}


def format_delta(d: PairedDelta) -> str:
    """A WER difference and its interval in percentage points."""
    return f"{d.delta * 100:+.2f} [{d.lo * 100:+.2f}, {d.hi * 100:+.2f}]"


# ----------------------------------------------------------------------------- worker side


def _load_sfc(folder: Path, threads: int, batch: int, spinning: bool,
              window: str) -> Transcriber:
    from sfc.runtime.whisper import WhisperRuntime
    from sfc.runtime.window import EncoderWindow

    rt = WhisperRuntime.open(folder, threads=threads, spinning=spinning,
                             window=EncoderWindow.parse(window))
    if batch > 1:
        rt.max_batch = batch  # decode one call's N windows as one batch

    def transcribe(audios: Sequence[np.ndarray]) -> list[str]:
        return [t.text for t in rt.transcribe_many(audios)]

    return transcribe


def _load_faster_whisper(compute_type: str, threads: int, batch: int) -> Transcriber:
    model = faster_whisper_model(compute_type, threads)
    if batch == 1:
        one = faster_whisper_transcriber(model)
        return lambda audios: [one(a) for a in audios]

    from faster_whisper import BatchedInferencePipeline

    pipeline = BatchedInferencePipeline(model)

    def transcribe_file(audio: np.ndarray) -> str:
        segments, _info = pipeline.transcribe(
            audio, batch_size=batch, beam_size=1, best_of=1, temperature=0.0,
            without_timestamps=True, condition_on_previous_text=False, vad_filter=False,
            language="en", clip_timestamps=fixed_clips(len(audio) / SAMPLE_RATE),
        )
        return " ".join(s.text.strip() for s in segments)

    return lambda audios: [transcribe_file(a) for a in audios]


def _load_ct2(threads: int) -> Transcriber:
    from faster_whisper.tokenizer import Tokenizer
    from faster_whisper.transcribe import get_suppressed_tokens

    model = faster_whisper_model("int8", threads)
    tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual,
                          task="transcribe", language="en")
    prompt = model.get_prompt(tokenizer, [], without_timestamps=True)
    suppress = list(get_suppressed_tokens(tokenizer, [-1]))
    frames = model.feature_extractor.nb_max_frames

    def transcribe(audios: Sequence[np.ndarray]) -> list[str]:
        # faster-whisper's features: its extractor, the last frame dropped (generate_segments).
        per_file = [feature_windows(model.feature_extractor(a)[:, :-1], frames)
                    for a in audios]
        windows = np.concatenate(per_file)
        results = model.model.generate(
            model.encode(windows), [prompt] * len(windows), beam_size=1,
            max_length=model.max_length, suppress_blank=True, suppress_tokens=suppress)
        texts = [tokenizer.decode(r.sequences_ids[0]).strip() for r in results]
        return regroup(texts, [len(w) for w in per_file])

    return transcribe


def load_variant(variant: str, threads: int, builds: Mapping[str, Path],
                 batch: int, window: str = "full") -> Transcriber:
    """The transcriber behind a variant name (`window`: the encoder window of ``+window``
    variants)."""
    from sfc.models import model_folder

    spinning = variant.endswith(SPIN)
    windowed = variant.endswith(WINDOW)
    name = variant.removesuffix(SPIN).removesuffix(WINDOW)
    if windowed and window == "full":
        raise ValueError(f"variant {variant!r} needs --sfc-window")
    chosen = window if windowed else "full"
    if name == SFC:
        return _load_sfc(model_folder(SFC_MODEL), threads, batch, spinning, chosen)
    if name.startswith(SFC_PREFIX) and name[len(SFC_PREFIX):] in builds:
        return _load_sfc(builds[name[len(SFC_PREFIX):]], threads, batch, spinning, chosen)
    if variant == FW_FP32:
        return _load_faster_whisper("float32", threads, batch)
    if variant == FW_INT8:
        return _load_faster_whisper("int8", threads, batch)
    if variant == f"{CT2_PREFIX}{batch}" and batch > 1:
        return _load_ct2(threads)
    raise ValueError(f"unknown variant {variant!r}")


def _select(data: Path, limit: int) -> list[Any]:
    from sfc.eval.manifest import read_manifest

    utterances = read_manifest(data)
    return utterances[:limit] if limit > 0 else utterances


def run_worker(variant: str, args: argparse.Namespace) -> None:
    """Load, warm up, time the transcription calls and print one marked JSON line."""
    from sfc.memory import peak_rss_kib
    from sfc.runtime.audio import load_audio

    utterances = _select(args.data, args.limit)
    audios = [load_audio(u.audio) for u in utterances]
    digest = hashlib.sha256()
    for a in audios:
        digest.update(a.tobytes())

    t0 = time.perf_counter()
    transcribe = load_variant(variant, args.threads, dict(args.sfc_build), args.batch,
                              args.sfc_window or "full")
    load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    transcribe(audios[:args.batch])
    warmup_s = time.perf_counter() - t0

    compute_s: list[float] = []
    hyps: list[str] = []
    for part in chunks(len(audios), args.batch):
        start = time.perf_counter()
        texts = transcribe(audios[part])
        compute_s.append(time.perf_counter() - start)
        hyps.extend(texts)

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
        "peak_rss_kib": peak_rss_kib(),
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
        "--batch", str(args.batch),
    ]
    for label, folder in args.sfc_build:
        cmd += ["--sfc-build", f"{label}={folder}"]
    if args.sfc_window is not None:
        cmd += ["--sfc-window", args.sfc_window]
    result: dict[str, Any] = run_marked_worker(cmd, variant, RESULT_MARKER)
    return result


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def _rtf(run: Mapping[str, Any]) -> float:
    return float(sum(run["compute_s"]) / sum(run["audio_s"]))


def summarize(rounds: Sequence[Mapping[str, Mapping[str, Any]]], references: Sequence[str],
              variants: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per variant: speed, ratios, latency, WER and its paired differences, agreement, RSS."""
    from sfc.eval.normalize import normalize_text
    from sfc.eval.wer import corpus_wer, count_errors

    counts = {v: [count_errors(ref, h) for ref, h in zip(references, rounds[0][v]["hyps"],
                                                         strict=True)]
              for v in variants}
    errors = {v: [c.errors for c in cs] for v, cs in counts.items()}
    ref_words = [c.ref_words for c in counts[variants[0]]]
    deltas = {ref: paired_deltas(errors, ref_words, ref) for ref in DELTA_REFERENCES}
    sfc_norm = [normalize_text(h) for h in rounds[0][SFC]["hyps"]]
    summary: dict[str, dict[str, Any]] = {}
    for variant in variants:
        runs = [r[variant] for r in rounds]
        rtfs = [_rtf(run) for run in runs]
        ratios = [_rtf(r[variant]) / _rtf(r[SFC]) for r in rounds]
        speedups = speed_ratios([r[FW_INT8] for r in rounds], runs)
        per_call = [statistics.median(ts) for ts in zip(*(run["compute_s"] for run in runs),
                                                        strict=True)]
        norm = [normalize_text(h) for h in runs[0]["hyps"]]
        stable = sum(
            all(normalize_text(run["hyps"][i]) == norm[i] for run in runs[1:])
            for i in range(len(norm))
        )
        rss = [int(run["peak_rss_kib"]) for run in runs]
        summary[variant] = {
            "rtf_median": statistics.median(rtfs),
            "rtf_min": min(rtfs),
            "rtf_max": max(rtfs),
            "rtf_per_round": rtfs,
            "throughput_median": statistics.median(1.0 / r for r in rtfs),
            "throughput_min": 1.0 / max(rtfs),
            "throughput_max": 1.0 / min(rtfs),
            # this variant's RTF / sfc-ort-fp32's (>1: slower than sfc)
            "ratio_to_sfc_median": statistics.median(ratios),
            "ratio_to_sfc_per_round": ratios,
            # faster-whisper-int8's compute time / this variant's (>1: this is faster)
            "speedup_vs_fw_int8_median": statistics.median(speedups),
            "speedup_vs_fw_int8_per_round": speedups,
            "latency_p50_s": _percentile(per_call, 50),
            "latency_p90_s": _percentile(per_call, 90),
            "wer": corpus_wer(counts[variant]),
            "errors": errors[variant],
            **{f"wer_delta_vs_{ref}": asdict(deltas[ref][variant]) for ref in DELTA_REFERENCES},
            "same_as_sfc": sum(a == b for a, b in zip(norm, sfc_norm, strict=True)),
            "stable_across_rounds": stable,
            "load_s_median": statistics.median(run["load_s"] for run in runs),
            "warmup_s_median": statistics.median(run["warmup_s"] for run in runs),
            "peak_rss_kib_max": max(rss),
            "peak_rss_kib_per_round": rss,
        }
    return summary


def _delta_cell(s: Mapping[str, Any], variant: str, ref: str) -> str:
    return "(ref)" if variant == ref else format_delta(PairedDelta(**s[f"wer_delta_vs_{ref}"]))


def table(summary: Mapping[str, Mapping[str, Any]], variants: Sequence[str],
          n_files: int, batch: int) -> tuple[list[str], list[list[str]]]:
    """Headers and rows: RTF in latency mode, throughput in throughput mode."""
    if batch > 1:
        speed = ["audio s / s median", "min / max"]
        per = "call"
    else:
        speed = ["RTF median", "RTF min / max"]
        per = "file"
    headers = ["variant", *speed, "fw-int8 s / this s", f"p50 ms/{per}", f"p90 ms/{per}",
               "WER", "vs fw-int8 ΔWER [CI]", "vs sfc-fp32 ΔWER [CI]",
               "same as sfc", "peak RSS MiB"]
    rows = []
    for v in variants:
        s = summary[v]
        if batch > 1:
            cells = [f"{s['throughput_median']:.1f}",
                     f"{s['throughput_min']:.1f} / {s['throughput_max']:.1f}"]
        else:
            cells = [f"{s['rtf_median']:.4f}", f"{s['rtf_min']:.4f} / {s['rtf_max']:.4f}"]
        rows.append([
            v, *cells,
            f"{s['speedup_vs_fw_int8_median']:.2f}x",
            f"{s['latency_p50_s'] * 1000:.0f}",
            f"{s['latency_p90_s'] * 1000:.0f}",
            f"{s['wer'] * 100:.2f}%",
            _delta_cell(s, v, FW_INT8),
            _delta_cell(s, v, SFC),
            f"{s['same_as_sfc']}/{n_files}",
            f"{s['peak_rss_kib_max'] / 1024:.0f}",
        ])
    return headers, rows


def _mode(batch: int) -> str:
    return f"throughput (batch {batch})" if batch > 1 else "latency (one file per call)"


def _caption(batch: int) -> str:
    speed = ("audio s / s = total audio s / total compute s, i.e. throughput (median over "
             "rounds; higher is faster)" if batch > 1 else
             "RTF = compute s / audio s (median over rounds; lower is faster)")
    per = (f"call of {batch} files" if batch > 1 else "file")
    return (
        f"{speed}; fw-int8 s / this s = median over rounds of faster-whisper-int8's total "
        "compute time / this variant's (>1: this variant is faster);\n"
        f"p50/p90 = latency per {per} (each call's median over rounds); WER after Whisper's "
        "English normalisation, round 1; ΔWER [CI] = this variant's WER minus the reference's,\n"
        f"percentage points [paired bootstrap 95% interval over utterances (seed "
        f"{BOOTSTRAP_SEED}, {BOOTSTRAP_RESAMPLES} resamples)]; same as sfc = normalised "
        "hypothesis equal to sfc-ort-fp32's;\npeak RSS = the worker process's VmHWM (audio "
        "and imports included), largest over rounds.")


def run_parent(args: argparse.Namespace) -> int:
    from sfc.atomic import write_json_atomic
    from sfc.models import model_folder

    variants = variant_names([label for label, _ in args.sfc_build], args.batch, args.sfc_spin,
                             args.sfc_window is not None)
    command = shlex.join(["python", *sys.argv])
    machine = machine_info(args.threads)
    line = machine_line(machine)
    print(line)
    print(f"command: {command}")

    folder = model_folder(SFC_MODEL)  # export once here, so no worker pays for it
    utterances = _select(args.data, args.limit)
    references = [u.text for u in utterances]
    print(f"sfc model: {folder}")
    for label, build in args.sfc_build:
        print(f"{SFC_PREFIX}{label}: {build}")
    print(f"data: {args.data} ({len(utterances)} files); mode: {_mode(args.batch)}; "
          f"rounds: {args.rounds}; order per round: {' '.join(variants)}", flush=True)

    rounds: list[dict[str, dict[str, Any]]] = []
    for n in range(1, args.rounds + 1):
        results: dict[str, dict[str, Any]] = {}
        for variant in variants:
            run = spawn_worker(variant, args)
            results[variant] = run
            print(f"  round {n}/{args.rounds} {variant:<22} RTF {_rtf(run):.4f} "
                  f"(load {run['load_s']:.1f} s, warm-up {run['warmup_s']:.2f} s, "
                  f"compute {sum(run['compute_s']):.1f} s, "
                  f"peak RSS {run['peak_rss_kib'] / 1024:.0f} MiB)", flush=True)
        rounds.append(results)

    digests = {r[v]["audio_sha256"] for r in rounds for v in variants}
    if len(digests) != 1:
        raise RuntimeError("workers saw different audio arrays; the comparison is invalid")

    audio_total = sum(rounds[0][SFC]["audio_s"])
    summary = summarize(rounds, references, variants)
    title = (f"whisper-tiny.en, {_mode(args.batch)}, {len(utterances)} files "
             f"({audio_total:.1f} s audio), {args.rounds} rounds, {args.threads} threads")
    headers, rows = table(summary, variants, len(utterances), args.batch)
    print()
    print_table(title, headers, rows, caption=_caption(args.batch), width=200)
    unstable = {v: s["stable_across_rounds"] for v, s in summary.items()
                if s["stable_across_rounds"] != len(utterances)}
    if unstable:
        print(f"note: hypotheses changed between rounds for some files: {unstable}")
    print(line)
    print(f"command: {command}")

    report = {
        "description": "Speed, WER and memory of sfc's ORT Whisper runtime vs faster-whisper "
                       "(CTranslate2)",
        "command": command,
        "machine": machine,
        "model": SFC_MODEL,
        "sfc_folder": str(folder),
        "sfc_builds": {label: str(build) for label, build in args.sfc_build},
        "sfc_window": args.sfc_window,
        "data": str(args.data),
        "limit": args.limit,
        "rounds": args.rounds,
        "threads": args.threads,
        "mode": "throughput" if args.batch > 1 else "latency",
        "batch": args.batch,
        "variants": list(variants),
        "bootstrap": {"seed": BOOTSTRAP_SEED, "n_resamples": BOOTSTRAP_RESAMPLES,
                      "level": 0.95, "references": list(DELTA_REFERENCES)},
        "n_files": len(utterances),
        "audio_s_total": audio_total,
        "audio_sha256": digests.pop(),
        "summary": summary,
        "runs": [
            {v: {k: r[v][k] for k in ("pid", "load_s", "warmup_s", "compute_s", "hyps",
                                      "peak_rss_kib")}
             for v in variants}
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
    parser.add_argument("--batch", type=int, default=1,
                        help="files per transcription call; > 1 is throughput mode "
                             "(default: %(default)s)")
    parser.add_argument("--sfc-build", type=parse_build, action="append", default=[],
                        metavar="LABEL=FOLDER",
                        help="also run the sfc build or export in FOLDER as variant "
                             "sfc-LABEL (repeatable)")
    parser.add_argument("--sfc-spin", action="store_true",
                        help="also run each sfc variant with ORT's idle threads spinning "
                             "(variant <name>+spin; sfc's runtime turns spinning off)")
    parser.add_argument("--sfc-window", default=None, metavar="SPEC",
                        help="also run each sfc variant with this encoder window (variant "
                             "<name>+window; sfc's --encoder-window, e.g. fit)")
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write the JSON report (default: benchmarks/results/"
                             "rtf_vs_faster_whisper_t{threads}.json, or "
                             "..._batch{N}_t{threads}.json with --batch N)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.batch < 1:
        parser.error("--batch must be at least 1")
    if args.limit < 0:
        parser.error("--limit must be 0 (all) or positive")
    labels = [label for label, _ in args.sfc_build]
    if len(set(labels)) != len(labels):
        parser.error(f"--sfc-build labels repeat: {labels}")
    if SFC in (SFC_PREFIX + label for label in labels):
        parser.error(f"--sfc-build label {SFC[len(SFC_PREFIX):]!r} names the FP32 variant")
    if args.sfc_window is not None:
        from sfc.errors import SfcError
        from sfc.runtime.window import EncoderWindow

        try:
            EncoderWindow.parse(args.sfc_window)
        except SfcError as exc:
            parser.error(str(exc))
    if args.json is None:
        args.json = default_json(args.batch, args.threads)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker, args)
        return 0
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
