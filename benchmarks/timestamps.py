"""Timestamps on long audio: WER, RTF and segment-boundary error of sfc's fixed windows,
its `seek` windows and its VAD windows (sequential and batched).

    python benchmarks/timestamps.py --work /tmp/sfc-long                 # 10 recordings
    python benchmarks/timestamps.py --work /tmp/sfc-long --recordings 2 --min-s 170 \\
        --max-s 190 --paired 50 --json /tmp/sfc-long/timestamps.json
    python benchmarks/timestamps.py --show --json /tmp/sfc-long/timestamps.json

1. The long-audio set. `--recordings` recordings, each of a length drawn uniformly from
   [--min-s, --max-s]: a pause, then utterances of `calibration_data/eval` each followed by a
   pause, until the length is reached. Utterances come in a seeded random order without
   repeats until the set is used up (then a new order); pauses are digital silence of a
   length drawn uniformly from [--pause-min, --pause-max]. All draws come from one
   `numpy.random.default_rng(--seed)`. Written to WORK/long/NAME.flac (16 kHz) with
   WORK/long/manifest.jsonl (a manifest `sfc eval` reads: the references joined with spaces),
   whose rows also hold the seed and every utterance's id, start and end in the recording
   (the join points).
2. Transcription: `WhisperRuntime.transcribe` on each recording (loaded with `load_audio`),
   greedy, compute timed around the call alone (VAD included): consecutive 30 s windows
   (8 decoded together, the runtime's default) once with timestamps and once without (the
   default path); windows that each start where the last complete segment of the one
   before ended (`sfc.runtime.seek`, the runtime's timestamped path without VAD; path
   seek: one window at a time, a recording being sequential; its text is also the seek
   path's without timestamps); then, with timestamps, the windows of Silero VAD's speech
   regions (`sfc.runtime.vad`, at most 30 s, cut at pauses) decoded `--vad-batches` at a
   time (default 1 and 4: sequential and batched; paths vad_b1, vad_b4).
3. Report: corpus WER (Whisper's normaliser) of every path over the recordings, their RTF
   (compute / audio seconds), and two boundary errors of each timestamped path's segments
   against the known join points, pooled over the recordings:
   - edge error: the join points are the utterances' edges, where each utterance's audio
     starts and ends in the recording. Each start is matched to the nearest segment start
     and each end to the nearest segment end (one segment boundary may serve several; a
     segment spanning two utterances leaves their inner edges far from any boundary, which
     counts); the error is the absolute time difference. Reported: its median over all
     edges, over starts and over ends, and the share within 0.3 s. An edge is the clip
     file's: the clean TTS clips hold 0.26-0.27 s of silence before the speech and
     0.31-0.33 s after it (eval_0003 and eval_0004, samples 40 dB below the peak), which
     this error includes; and Whisper usually ends a segment where the next one starts, so
     end errors carry the pause that follows.
   - pause error: the join points are the pauses (the one before each utterance, the
     leading silence included); the error is the distance from the pause to the nearest
     segment boundary of either kind, 0 when one lies inside it: whether, and by how much,
     the segmentation misses the silence between two utterances. Reported: its median and
     the share within 0.3 s.
4. `--paired N`: the first N utterances of the eval set one at a time, without timestamps
   and with them (the runtime's default timestamped path: seek windows), and the paired
   bootstrap of WER(timestamps) - WER(default) (`sfc.eval.wer.paired_bootstrap_delta`,
   seed 0): whether decoding with timestamp tokens changes what is transcribed.

The JSON (`--json`, default WORK/timestamps.json) holds the machine, the command, the set's
seed and join points, every hypothesis and segment.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from common import (
    faster_whisper_model,
    machine_info,
    machine_line,
    outside_repo,
    print_table,
    run_or_show,
)

from sfc.eval import Utterance, evaluate, read_manifest
from sfc.eval.wer import ErrorCounts, corpus_wer, count_errors, paired_bootstrap_delta
from sfc.runtime.audio import SAMPLE_RATE, load_audio
from sfc.runtime.segments import Segment
from sfc.runtime.vad import SileroVad
from sfc.runtime.whisper import WhisperRuntime

REPO = Path(__file__).resolve().parent.parent
EVAL = REPO / "calibration_data" / "eval"
NEAR_S = 0.3  # the target for the median boundary error


@dataclass(frozen=True)
class Way:
    """One way of transcribing: its name, with timestamps or not, VAD windows or not, how
    many windows are decoded together, and `seek` windows or fixed ones (without VAD)."""

    name: str
    timestamps: bool
    vad: bool
    batch: int
    seek: bool = False


def ways(vad_batches: Sequence[int]) -> list[Way]:
    """The fixed-window paths, the seek path, then one VAD path (with timestamps) per
    batch size."""
    return [Way("timestamps", True, False, 8), Way("default", False, False, 8),
            Way("seek", True, False, 1, seek=True),
            *(Way(f"vad_b{b}", True, True, b) for b in vad_batches)]


@dataclass(frozen=True)
class Placed:
    """One utterance in a long recording: its id and where its audio starts and ends (s)."""

    id: str
    start: float
    end: float


@dataclass(frozen=True)
class LongRecording:
    """A recording of joined utterances: its file, reference and the utterances' places."""

    name: str
    audio: Path
    text: str
    seconds: float
    utterances: tuple[Placed, ...]


def make_long_set(utterances: Sequence[Utterance], folder: Path, n: int, min_s: float,
                  max_s: float, pause: tuple[float, float], seed: int) -> list[LongRecording]:
    """Write `n` recordings of joined utterances and pauses into `folder` (see the docstring)."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for r in range(n):
        target = rng.uniform(min_s, max_s)
        parts = [np.zeros(round(rng.uniform(*pause) * SAMPLE_RATE), np.float32)]
        placed, texts = [], []
        at = len(parts[0])
        while at < target * SAMPLE_RATE:
            if not order:
                order = list(rng.permutation(len(utterances)))
            utt = utterances[order.pop()]
            audio = load_audio(utt.audio)
            gap = np.zeros(round(rng.uniform(*pause) * SAMPLE_RATE), np.float32)
            placed.append(Placed(utt.id, at / SAMPLE_RATE, (at + len(audio)) / SAMPLE_RATE))
            texts.append(utt.text)
            parts += [audio, gap]
            at += len(audio) + len(gap)
        name = f"long_{r:02d}"
        path = folder / f"{name}.flac"
        sf.write(path, np.concatenate(parts), SAMPLE_RATE)
        out.append(LongRecording(name, path, " ".join(texts), at / SAMPLE_RATE, tuple(placed)))
    rows = [{"audio": rec.audio.name, "text": rec.text, "id": rec.name,
             "duration_s": rec.seconds, "seed": seed,
             "utterances": [asdict(p) for p in rec.utterances]} for rec in out]
    (folder / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


def _nearest(times: np.ndarray, lo: float, hi: float) -> float:
    """Distance from [lo, hi] to the nearest of `times` (0 inside; inf without times)."""
    if not times.size:
        return float("inf")
    return float(np.maximum(np.maximum(lo - times, times - hi), 0.0).min())


def edge_errors(utterances: Sequence[Placed],
                segments: Sequence[Segment]) -> tuple[list[float], list[float]]:
    """(start errors, end errors): each utterance edge's distance to the nearest segment
    boundary of its kind."""
    starts = np.array([s.start for s in segments])
    ends = np.array([s.end for s in segments])
    return ([_nearest(starts, u.start, u.start) for u in utterances],
            [_nearest(ends, u.end, u.end) for u in utterances])


def pause_errors(utterances: Sequence[Placed], segments: Sequence[Segment]) -> list[float]:
    """Each pause's distance to the nearest segment boundary (0 when one lies inside it)."""
    bounds = np.array([t for s in segments for t in (s.start, s.end)])
    ends = [0.0] + [u.end for u in utterances[:-1]]
    return [_nearest(bounds, lo, u.start) for lo, u in zip(ends, utterances, strict=True)]


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _share(errors: Sequence[float]) -> float:
    """The share of `errors` within the target."""
    return sum(e <= NEAR_S for e in errors) / len(errors) if errors else float("nan")


# A peer's path: audio -> (text, segments with times in the recording).
Peer = Callable[[np.ndarray], tuple[str, list[Segment]]]


def faster_whisper_peers(threads: int, batch: int) -> dict[str, Peer]:
    """faster-whisper INT8 on the same CTranslate2 weights, greedy, English, timestamps on:
    its sequential decoder (30 s windows that restart at the last timestamp) and its
    `BatchedInferencePipeline` (Silero VAD chunks, `batch` at a time)."""
    from faster_whisper import BatchedInferencePipeline

    model = faster_whisper_model("int8", threads)
    batched = BatchedInferencePipeline(model)
    greedy = {"beam_size": 1, "best_of": 1, "temperature": 0.0, "language": "en",
              "condition_on_previous_text": False}

    def collect(found: Any) -> tuple[str, list[Segment]]:
        segments = [Segment(float(s.start), float(s.end), s.text.strip(), ()) for s in found]
        return " ".join(s.text for s in segments if s.text), segments

    return {"fw_int8": lambda audio: collect(model.transcribe(audio, **greedy)[0]),
            f"fw_int8_batched_b{batch}": lambda audio: collect(
                batched.transcribe(audio, batch_size=batch, **greedy)[0])}


def run_long(runtime: WhisperRuntime, recordings: Sequence[LongRecording],
             ways: Sequence[Way], peers: Mapping[str, Peer] | None = None) -> dict[str, Any]:
    """Every path (and peer) on every recording: hypotheses, errors, compute and boundary
    errors."""
    peers = peers or {}
    vad = SileroVad.open() if any(w.vad for w in ways) else None
    rows = []
    for rec in recordings:
        audio = load_audio(rec.audio)
        row: dict[str, Any] = {"name": rec.name, "seconds": rec.seconds,
                               "utterances": [asdict(p) for p in rec.utterances]}
        for way in ways:
            runtime.max_batch = way.batch
            t0 = time.perf_counter()
            out = runtime.transcribe(audio, way.timestamps, vad if way.vad else None,
                                     way.seek)
            compute = time.perf_counter() - t0
            counts = count_errors(rec.text, out.text)
            row[way.name] = {"hypothesis": out.text, "compute_s": compute,
                             "counts": asdict(counts), "loop_stops": out.loop_stops}
            if out.segments is not None:
                row[way.name] |= _placed(rec, out.segments)
        for name, peer in peers.items():
            t0 = time.perf_counter()
            text, segments = peer(audio)
            row[name] = {"hypothesis": text, "compute_s": time.perf_counter() - t0,
                         "counts": asdict(count_errors(rec.text, text)), "loop_stops": 0,
                         **_placed(rec, segments)}
        rows.append(row)
        print(f"{rec.name}: {rec.seconds:.0f} s, {len(rec.utterances)} utterances, "
              + ", ".join(f"{w.name} {len(row[w.name].get('segments', ()))} segments"
                          for w in ways if w.timestamps), file=sys.stderr)
    return {"recordings": rows,
            "summary": summarize_long(rows, [w.name for w in ways] + list(peers))}


def _placed(rec: LongRecording, segments: Sequence[Segment]) -> dict[str, Any]:
    """A path's segments and their boundary errors against the recording's join points."""
    starts, ends = edge_errors(rec.utterances, segments)
    return {"segments": [asdict(s) for s in segments], "start_errors": starts,
            "end_errors": ends, "pause_errors": pause_errors(rec.utterances, segments)}


def summarize_long(rows: Sequence[dict[str, Any]],
                   names: Sequence[str] = ("timestamps", "default")) -> dict[str, Any]:
    """Corpus WER and RTF per path; boundary-error medians of the timestamped ones
    (`boundaries` for the fixed windows, `boundaries_<path>` for the others)."""
    audio_s = sum(r["seconds"] for r in rows)
    out: dict[str, Any] = {"paths": list(names), "audio_s": audio_s}
    for path in names:
        runs = [r[path] for r in rows]
        out[path] = {
            "wer": corpus_wer(ErrorCounts(**r["counts"]) for r in runs),
            "rtf": sum(r["compute_s"] for r in runs) / audio_s,
            "loop_stops": sum(r["loop_stops"] for r in runs)}
        if "segments" in runs[0]:
            key = "boundaries" if path == "timestamps" else f"boundaries_{path}"
            out[key] = boundaries([r[path] for r in rows], rows)
    return out


def merge_long(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`old`'s long-audio results with `new`'s paths added (or replacing the same names),
    recording by recording, and the summary computed again over all paths."""
    rows = {r["name"]: dict(r) for r in old["recordings"]}
    if set(rows) != {r["name"] for r in new["recordings"]}:
        raise SystemExit("--merge: the reports hold different recordings")
    names = list(old["summary"]["paths"])
    for path in new["summary"]["paths"]:
        if path not in names:
            names.append(path)
    for r in new["recordings"]:
        rows[r["name"]].update({p: r[p] for p in new["summary"]["paths"]})
    merged = list(rows.values())
    return {"recordings": merged, "summary": summarize_long(merged, names)}


def paired_by_recording(rows: Sequence[dict[str, Any]], names: Sequence[str],
                        against: str) -> dict[str, dict[str, Any]]:
    """WER(path) - WER(`against`) per path, paired bootstrap over the recordings (the
    units that both paths transcribe whole; seed 0)."""
    def errors(path: str) -> list[int]:
        return [ErrorCounts(**r[path]["counts"]).errors for r in rows]

    refs = [r[against]["counts"]["ref_words"] for r in rows]
    return {path: asdict(paired_bootstrap_delta(errors(against), errors(path), refs, seed=0))
            for path in names if path != against}


def boundaries(runs: Sequence[dict[str, Any]],
               rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The boundary errors of one path's runs, pooled over the recordings."""
    def pooled(key: str) -> list[float]:
        return [e for r in runs for e in r[key]]

    starts, ends, pauses = pooled("start_errors"), pooled("end_errors"), pooled("pause_errors")
    edges = starts + ends
    return {
        "edges": len(edges), "median_s": _median(edges), "median_start_s": _median(starts),
        "median_end_s": _median(ends), "within_target": _share(edges),
        "pauses": len(pauses), "median_pause_s": _median(pauses),
        "pauses_within_target": _share(pauses),
        "segments": sum(len(r["segments"]) for r in runs),
        "utterances": sum(len(r["utterances"]) for r in rows)}


def run_paired(runtime: WhisperRuntime, utterances: Sequence[Utterance]) -> dict[str, Any]:
    """Both paths on short utterances one at a time; the paired WER difference."""
    results = {path: evaluate(lambda a, ts=ts: runtime.transcribe(a, ts), utterances,
                              model=runtime.card.name, data=str(EVAL), progress=False)
               for path, ts in (("default", False), ("timestamps", True))}
    base, timed = results["default"].utterances, results["timestamps"].utterances
    delta = paired_bootstrap_delta([u.errors for u in base], [u.errors for u in timed],
                                   [u.ref_words for u in base], seed=0)
    return {"n": len(utterances), "wer_default": results["default"].wer,
            "wer_timestamps": results["timestamps"].wer, "delta": asdict(delta),
            "differing": [{"id": a.id, "default": a.hypothesis, "timestamps": b.hypothesis}
                          for a, b in zip(base, timed, strict=True)
                          if a.hypothesis != b.hypothesis]}


def show(report: dict[str, Any]) -> None:
    """The tables of a saved report."""
    print(machine_line(report["machine"]))
    print(f"command: {report['command']}")
    s = report["long"]["summary"]
    names = s.get("paths", ["default", "timestamps"])
    print_table(
        f"Long audio: {len(report['long']['recordings'])} recordings, {s['audio_s']:.0f} s, "
        f"seed {report['args']['seed']}, {report['args']['model']}",
        ["path", "WER %", "RTF", "loop stops"],
        [[p, f"{100 * s[p]['wer']:.2f}", f"{s[p]['rtf']:.4f}", str(s[p]["loop_stops"])]
         for p in names],
        caption="default, timestamps: fixed 30 s windows (--no-seek), 8 decoded together; seek: "
        "windows from the last complete segment, with timestamps, one at a time; vad_bN: "
        "VAD windows with timestamps, N decoded together (VAD time included); fw_int8*: "
        "faster-whisper INT8, sequential and BatchedInferencePipeline (its VAD included)")
    rows = report["long"]["recordings"]
    if len(rows) > 1 and "default" in names:
        print_table(
            f"Paired over the {len(rows)} recordings, against fixed windows (default)",
            ["path", "ΔWER points [95% CI]", "p", "RTF default / path"],
            [[p, f"{100 * d['delta']:+.2f} [{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]",
              f"{d['p_value']:.3f}", f"{s['default']['rtf'] / s[p]['rtf']:.2f}x"]
             for p, d in paired_by_recording(rows, names, "default").items()])
    for key in [k for k in s if k.startswith("boundaries")]:
        b = s[key]
        print(f"{key.removeprefix('boundaries_') if '_' in key else 'timestamps'}: "
              f"{b['segments']} segments for {b['utterances']} utterances; edge error median "
              f"{b['median_s']:.2f} s (starts {b['median_start_s']:.2f}, ends "
              f"{b['median_end_s']:.2f}) over {b['edges']} utterance edges, "
              f"{100 * b['within_target']:.0f}% within {NEAR_S} s; pause error median "
              f"{b['median_pause_s']:.2f} s over {b['pauses']} pauses, "
              f"{100 * b['pauses_within_target']:.0f}% within {NEAR_S} s")
    paired = report.get("paired")
    if paired:
        d = paired["delta"]
        print(f"paired, first {paired['n']} eval utterances: WER default "
              f"{100 * paired['wer_default']:.2f}%, with timestamps "
              f"{100 * paired['wer_timestamps']:.2f}%, delta {100 * d['delta']:+.2f} points "
              f"[{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}] (p={d['p_value']:.2f}); "
              f"{len(paired['differing'])} transcripts differ")


def run(args: argparse.Namespace) -> int:
    """Make the set, run both parts, save and show the report."""
    from sfc.models import model_folder

    utterances = read_manifest(EVAL)
    recordings = make_long_set(utterances, args.work / "long", args.recordings, args.min_s,
                               args.max_s, (args.pause_min, args.pause_max), args.seed)
    chosen = ways(args.vad_batches)
    if args.paths:
        unknown = set(args.paths) - {w.name for w in chosen}
        if unknown:
            raise SystemExit(f"--paths: unknown {', '.join(sorted(unknown))} (known: "
                             f"{', '.join(w.name for w in chosen)})")
        chosen = [w for w in chosen if w.name in args.paths]
    runtime = WhisperRuntime.open(model_folder(args.model), threads=args.threads)
    report: dict[str, Any] = {
        "machine": machine_info(args.threads),
        "command": shlex.join(["python", "benchmarks/timestamps.py", *sys.argv[1:]]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "long": run_long(runtime, recordings, chosen,
                         faster_whisper_peers(args.threads, args.fw_batch)
                         if args.faster_whisper else None),
    }
    if args.paired:
        report["paired"] = run_paired(runtime, utterances[:args.paired])
    if args.merge:  # an earlier report's paths next to these (its machine state noted)
        old = json.loads(args.merge.read_text())
        report["long"] = merge_long(old["long"], report["long"])
        report["merged_from"] = {"file": str(args.merge), "command": old["command"],
                                 "machine": old["machine"]}
        if "paired" in old and "paired" not in report:
            report["paired"] = old["paired"]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    show(report)
    print(f"report: {args.json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--model", default="whisper-tiny.en", help="zoo name or sfc folder")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sfc-long"),
                        help="where the long-audio set is written (outside the repository)")
    parser.add_argument("--recordings", type=int, default=10)
    parser.add_argument("--min-s", type=float, default=180.0)
    parser.add_argument("--max-s", type=float, default=600.0)
    parser.add_argument("--pause-min", type=float, default=0.5)
    parser.add_argument("--pause-max", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--faster-whisper", action="store_true",
                        help="also run faster-whisper INT8, sequential and batched (peers)")
    parser.add_argument("--fw-batch", type=int, default=8,
                        help="faster-whisper's BatchedInferencePipeline batch size")
    parser.add_argument("--vad-batches", type=lambda v: [int(b) for b in v.split(",") if b],
                        default=[1, 4], help="VAD paths: windows decoded together, comma-"
                        "separated (empty: no VAD path)")
    parser.add_argument("--paths", type=lambda v: [p for p in v.split(",") if p],
                        default=None, help="run only these paths (comma-separated names)")
    parser.add_argument("--merge", type=Path, default=None, metavar="REPORT",
                        help="add this run's paths to an earlier report of the same set")
    parser.add_argument("--paired", type=int, default=50,
                        help="first N eval utterances for the paired WER check (0: skip)")
    parser.add_argument("--json", type=Path, default=None,
                        help="report file (default WORK/timestamps.json)")
    parser.add_argument("--show", action="store_true", help="print a saved report")
    args = parser.parse_args(argv)
    args.work = outside_repo(parser, args.work, REPO)
    if args.json is None:
        args.json = args.work / "timestamps.json"
    return run_or_show(args, run, show)


if __name__ == "__main__":
    raise SystemExit(main())
