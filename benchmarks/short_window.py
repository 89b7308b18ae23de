"""Whisper's encoder on a window shorter than 30 s for short clips (whisper.cpp's `audio_ctx`).

    python benchmarks/short_window.py [--windows 30,15,10,8] [--limit N] [--threads 2]
    python benchmarks/short_window.py --show

sfc's encoder sees a 30 s window (3000 mel frames, 1500 positions) by default, however
short the clip (`--encoder-window fit` picks a window per clip instead). This script
measures what one fixed W-second window for every clip costs in WER and saves in time:

1. Parity. sfc's export (format 3) takes any even number of frames: conv1, GELU, conv2,
   GELU, then the first frames / 2 rows of the positional table, the layers and the final
   layer norm, and the decoder any cross-attention length. Its encoder.onnx must match its
   PyTorch module (`PARITY_TOL`) at 30 s and at the shortest W.
2. Transcription. Features are `whisper_windows` (log-mel of the clip and 30 s of zeros,
   normalised together) cut to the first W * 100 frames: "pad to 30 s, keep the first W s",
   exact for clips no longer than W (a W shorter than the longest clip is refused). They go
   to `WhisperRuntime.decode_windows`, each W with its own sessions; the utterances are
   scored by `sfc.eval.evaluate` one at a time, every W in turn (rotating which goes
   first), so a change in the machine's load touches all windows alike.
3. Report per W: corpus WER with its bootstrap interval, the paired bootstrap of
   WER(W) - WER(30) (seeded), loop-guard stops, the encoder's median latency on one window
   (the runtime's `encode`, after warm-up, the windows timed round-robin) with its speed-up
   over 30 s, and the end-to-end RTF (features, encoder, decoder, tokenizer; compute over
   audio seconds). A W "loses" when the paired interval lies above 0.

Results (machine, command, every number, per-utterance errors and hypotheses):
benchmarks/results/short_window.json.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from common import (
    eval_summary,
    machine_info,
    machine_line,
    per_utterance,
    print_table,
    run_or_show,
)

from sfc.errors import SfcError
from sfc.runtime.features import LogMelSpec, whisper_windows

if TYPE_CHECKING:

    from sfc.eval import Utterance
    from sfc.models.whisper_hf import LoadedWhisper
    from sfc.runtime.whisper import Transcript, WhisperRuntime

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "short_window.json"
DEFAULT_WINDOWS = "30,15,10,8"
ENCODER_OUTPUTS = ("last_hidden_state", "cross_key", "cross_value")
# Same weights, same float32 ops: only ORT's fusions and the positional Slice differ.
PARITY_TOL = 1e-3


# ----------------------------------------------------------------------------- pure parts


def parse_windows(text: str) -> tuple[int, ...]:
    """`--windows`: comma-separated whole seconds, each once, in the order given."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of whole seconds: {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"windows must be positive seconds: {text!r}")
    return tuple(dict.fromkeys(values))


def with_baseline(windows: Sequence[int], baseline: int) -> tuple[int, ...]:
    """`baseline` first (the paired comparisons' reference), then the others, longest first.

    A window longer than the model's own (no positions for it) is a user error.
    """
    too_long = [w for w in windows if w > baseline]
    if too_long:
        raise SfcError(f"windows {too_long} exceed the model's {baseline} s window")
    return (baseline, *sorted({w for w in windows if w != baseline}, reverse=True))


def window_frames(seconds: int, spec: LogMelSpec) -> int:
    """Mel frames in a `seconds` window (100 per second at Whisper's 10 ms hop)."""
    return seconds * spec.sample_rate // spec.hop_length


def short_windows(audio: np.ndarray, spec: LogMelSpec, frames: int) -> np.ndarray:
    """Encoder input [1, n_mels, frames]: Whisper's 30 s window cut to its first `frames`.

    Exactly the model's 30 s input minus frames that hold only padding, so the clip must
    fit: one longer than `frames` is refused rather than silently cut.
    """
    content = len(audio) // spec.hop_length
    if content > frames:
        raise SfcError(f"a {len(audio) / spec.sample_rate:.2f} s clip does not fit a "
                       f"{frames}-frame window")
    return np.ascontiguousarray(whisper_windows(audio, spec)[:1, :, :frames])


def rotated(items: Sequence[int], shift: int) -> list[int]:
    """`items` starting at position `shift` (mod its length), wrapping round."""
    k = shift % len(items)
    return [*items[k:], *items[:k]]


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    """One row per window: WER, paired delta vs the baseline, loop stops, encoder, RTF."""
    rows = []
    for w in result["windows"]:
        v = result["variants"][str(w)]
        e, d = v["eval"], v["paired_vs_baseline"]
        delta = ("-" if d is None else
                 f"{100 * d['delta']:+.2f} [{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]")
        rows.append([
            f"{w} s", str(v["frames"]),
            f"{100 * e['wer']:.2f} [{100 * e['ci_lo']:.2f}, {100 * e['ci_hi']:.2f}]",
            delta, "yes" if v["loses"] else "no", str(e["loop_stops"]),
            f"{1e3 * v['encoder_median_s']:.1f}", f"{v['encoder_speedup']:.2f}x",
            f"{e['rtf']:.4f}",
        ])
    return rows


# ----------------------------------------------------------------------------- parity


def check_parity(loaded: LoadedWhisper, export: Path, features: np.ndarray,
                 short_frames: int, threads: int) -> dict[str, Any]:
    """Max abs differences of the export's encoder.onnx against its PyTorch module (the
    export's own, `whisper_export._modules`) at the full window and at `short_frames`; an
    AssertionError over `PARITY_TOL`."""
    import torch

    from sfc.card import ModelCard
    from sfc.models.whisper_export import _modules
    from sfc.runtime.session import open_session

    session = open_session(export / ModelCard.load(export).graphs["encoder"].path,
                           threads=threads)
    module = _modules(loaded)[0]
    report: dict[str, Any] = {"frames": features.shape[-1], "short_frames": short_frames,
                              "tol": PARITY_TOL}
    for key, frames in (("full", features.shape[-1]), ("short", short_frames)):
        x = np.ascontiguousarray(features[:, :, :frames])
        with torch.no_grad():
            reference = [t.numpy() for t in module(torch.from_numpy(x))]
        ours = session.run(list(ENCODER_OUTPUTS), {"input_features": x})
        report[key] = {n: float(np.max(np.abs(a - b)))
                       for n, a, b in zip(ENCODER_OUTPUTS, ours, reference, strict=True)}
    worst = max(max(report["full"].values()), max(report["short"].values()))
    assert worst <= PARITY_TOL, f"encoder.onnx differs from PyTorch by {worst:.3g}: {report}"
    return report


# ----------------------------------------------------------------------------- measurement


def transcriber(runtime: WhisperRuntime, frames: int) -> Callable[[np.ndarray], Transcript]:
    """Audio -> text through the runtime's decoder with the encoder on `frames` frames."""

    def transcribe(audio: np.ndarray) -> Transcript:
        return runtime.decode_windows(short_windows(audio, runtime.mel, frames))[0]

    return transcribe


def encoder_latencies(runtimes: dict[int, WhisperRuntime], features: np.ndarray,
                      frames: dict[int, int], runs: int, warmup: int) -> dict[int, list[float]]:
    """Seconds of `runtime.encode` on one window per W, the windows timed round-robin."""
    inputs = {w: np.ascontiguousarray(features[:, :, :frames[w]]) for w in runtimes}
    times: dict[int, list[float]] = {w: [] for w in runtimes}
    for i in range(warmup + runs):
        for w in runtimes:
            start = time.perf_counter()
            runtimes[w].encode(inputs[w])
            if i >= warmup:
                times[w].append(time.perf_counter() - start)
    return times


def interleaved_eval(transcribers: dict[int, Callable[[np.ndarray], Transcript]],
                     utterances: Sequence[Utterance], data: str, seed: int,
                     n_resamples: int) -> dict[int, Any]:
    """`evaluate` of every W, one utterance at a time, every W in turn."""
    from rich.progress import TextColumn

    from sfc.eval import evaluate, summarize
    from sfc.eval.results import UtteranceResult
    from sfc.progress import progress_bar

    scored: dict[int, list[UtteranceResult]] = {w: [] for w in transcribers}
    order = list(transcribers)
    with progress_bar(TextColumn("{task.fields[note]}")) as bar:
        task = bar.add_task("short windows", total=len(utterances), note="")
        for i, utt in enumerate(utterances):
            for w in rotated(order, i):
                one = evaluate(transcribers[w], [utt], model=f"{w} s", data=data,
                               n_resamples=1, progress=False)
                scored[w].extend(one.utterances)
            bar.update(task, advance=1, note=utt.id)
    return {w: summarize(f"{w} s window", data, scored[w], seed=seed, n_resamples=n_resamples)
            for w in order}


def durations(utterances: Sequence[Utterance]) -> dict[str, float]:
    """Seconds of audio per utterance id, from the manifest or the file's header."""
    import soundfile as sf

    return {u.id: u.duration_s if u.duration_s is not None else float(sf.info(u.audio).duration)
            for u in utterances}


def run(args: argparse.Namespace) -> int:
    from sfc.atomic import write_json_atomic
    from sfc.card import ModelCard
    from sfc.eval import paired_bootstrap_delta, read_manifest
    from sfc.models import model_folder
    from sfc.models.whisper_hf import load_whisper
    from sfc.models.zoo import locate_checkpoint
    from sfc.runtime.audio import load_audio
    from sfc.runtime.whisper import WhisperRuntime

    command = shlex.join(["python", *sys.argv])
    machine = machine_info(args.threads)
    print(machine_line(machine), flush=True)
    export = model_folder(args.model)
    utterances = read_manifest(args.data)[: args.limit]
    mel = LogMelSpec.from_dict(ModelCard.load(export).preprocessing or {})
    windows = with_baseline(args.windows, mel.chunk_length_s)
    seconds = durations(utterances)
    longest = max(seconds, key=lambda i: seconds[i])
    unfit = [w for w in windows if seconds[longest] > w]
    if unfit:
        args.parser.error(f"windows {unfit} s are shorter than clip {longest} "
                          f"({seconds[longest]:.2f} s)")
    frames = {w: window_frames(w, mel) for w in windows}

    loaded = load_whisper(locate_checkpoint(args.model))
    probe = whisper_windows(load_audio(utterances[0].audio), mel)[:1]
    parity = check_parity(loaded, export, probe, frames[windows[-1]], args.threads)
    print(f"parity: max abs diff of encoder.onnx vs PyTorch at {parity['frames']} frames "
          f"{parity['full']}; at {parity['short_frames']} frames {parity['short']}", flush=True)

    runtimes = {w: WhisperRuntime.open(export, threads=args.threads) for w in windows}
    latencies = encoder_latencies(runtimes, probe, frames, args.runs, args.warmup)
    evaluated = interleaved_eval({w: transcriber(runtimes[w], frames[w]) for w in windows},
                                 utterances, str(args.data), args.seed, args.n_resamples)

    base = windows[0]
    ref_words = [u.ref_words for u in evaluated[base].utterances]
    base_errors = [u.errors for u in evaluated[base].utterances]
    base_median = statistics.median(latencies[base])
    variants: dict[str, Any] = {}
    for w in windows:
        ev = evaluated[w]
        errors = [u.errors for u in ev.utterances]
        delta = None if w == base else paired_bootstrap_delta(
            base_errors, errors, ref_words, seed=args.seed,
            n_resamples=args.n_resamples)
        median = statistics.median(latencies[w])
        variants[str(w)] = {
            "seconds": w, "frames": frames[w], "positions": frames[w] // 2,
            "eval": eval_summary(ev), "paired_vs_baseline": None if delta is None
            else asdict(delta), "loses": delta is not None and delta.lo > 0.0,
            "encoder_s": latencies[w], "encoder_median_s": median,
            "encoder_speedup": base_median / median, **per_utterance(ev)}
    result = {"command": command, "machine": machine, "model": args.model,
              "export": str(export), "data": str(args.data),
              "n": len(utterances), "ids": [u.id for u in utterances], "ref_words": ref_words,
              "longest_clip": {"id": longest, "seconds": seconds[longest]},
              "windows": list(windows), "baseline": base, "seed": args.seed,
              "n_resamples": args.n_resamples, "threads": args.threads,
              "encoder_runs": args.runs, "encoder_warmup": args.warmup, "parity": parity,
              "variants": variants}
    write_json_atomic(Path(args.json), result)
    show(result)
    print(f"wrote {args.json}")
    return 0


def show(result: dict[str, Any]) -> None:
    """Print the saved table."""
    print(machine_line(result["machine"]))
    print(f"command: {result['command']}")
    p = result["parity"]
    if "full" in p:
        print(f"parity (max abs diff) of encoder.onnx vs PyTorch: at {p['frames']} frames "
              f"{p['full']}; at {p['short_frames']} frames {p['short']}")
    else:  # reports from before export format 3 (the script's own dynamic encoder)
        print(f"parity (max abs diff): vs export encoder.onnx at {p['frames']} frames "
              f"{p['vs_export_onnx']}; vs PyTorch at {p['short_frames']} frames "
              f"{p['vs_torch_short']}")
    print_table(
        f"{result['model']} FP32, encoder window vs WER (n={result['n']}, longest clip "
        f"{result['longest_clip']['seconds']:.2f} s, threads {result['threads']})",
        ["window", "frames", "WER % [95% CI]", f"Δ vs {result['baseline']} s (pts) [paired CI]",
         "loses", "loop stops", "encoder ms (median)", "encoder speed-up", "RTF"],
        table_rows(result),
        caption=f"paired bootstrap seed {result['seed']}, {result['n_resamples']} resamples; "
                f"encoder: median of {result['encoder_runs']} runs of one window after "
                f"{result['encoder_warmup']} warm-up, windows round-robin")


def main() -> int:
    from sfc.models import ZOO
    from sfc.paths import BUNDLED_DATA

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="whisper-tiny.en", choices=sorted(ZOO))
    parser.add_argument("--windows", type=parse_windows, default=parse_windows(DEFAULT_WINDOWS),
                        help=f"window seconds (default {DEFAULT_WINDOWS}; 30 is always run)")
    parser.add_argument("--data", type=Path, default=BUNDLED_DATA / "eval")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20, help="timed encoder runs per window")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-resamples", type=int, default=2000)
    parser.add_argument("--json", default=str(RESULTS))
    parser.add_argument("--show", action="store_true")
    args = parser.parse_args()
    args.parser = parser
    return run_or_show(args, run, show)


if __name__ == "__main__":
    sys.exit(main())
