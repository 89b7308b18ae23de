"""Whisper's encoder on a window shorter than 30 s for short clips (whisper.cpp's `audio_ctx`).

    python benchmarks/short_window.py [--windows 30,15,10,8] [--limit N] [--threads 2]
    python benchmarks/short_window.py --show

sfc's encoder always sees a 30 s window (3000 mel frames, 1500 positions), however short
the clip. This script measures what a W-second window costs in WER and saves in time:

1. Export. The zoo model's PyTorch weights (loaded as `sfc export` loads them) go into an
   encoder ONNX whose number of frames is dynamic: conv1, GELU, conv2, GELU, then the first
   frames / 2 rows of the positional table, the layers and the final layer norm (the order
   of transformers' `WhisperEncoder.forward`, which refuses anything but 3000 frames), and
   the export's own cross-attention K/V projection on top. The FP32 export's decoder gets
   a dynamic cross-attention length. Both go into WORK/run with the export's tokenizer and
   card (graph shapes updated); one folder serves every W, since only the input's length
   changes. At 3000 frames the new encoder must match the export's `encoder.onnx` (all
   three outputs, `PARITY_TOL`); at the shortest W it must match PyTorch.
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
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from common import (
    eval_summary,
    machine_info,
    machine_line,
    outside_repo,
    per_utterance,
    print_table,
    run_or_show,
)

from sfc.errors import SfcError
from sfc.runtime.cross import STACKED
from sfc.runtime.features import LogMelSpec, whisper_windows

if TYPE_CHECKING:
    import torch

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


# ----------------------------------------------------------------------------- export


def dynamic_encoder(loaded: LoadedWhisper) -> torch.nn.Module:
    """The export's encoder module with HF's encoder swapped for one that takes any frames.

    The export's wrapper calls `self.encoder(features).last_hidden_state` and adds the
    cross-attention K/V; only that inner call changes, so the K/V are the export's own.
    """
    from torch import nn
    from transformers.modeling_outputs import BaseModelOutput

    from sfc.models.whisper_export import _modules

    class AnyFrames(nn.Module):
        """transformers' `WhisperEncoder.forward` (inference) without its 3000-frame check:
        positions 0 .. frames / 2 - 1 of the table, as the first frames of a 30 s window get."""

        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_features: torch.Tensor) -> BaseModelOutput:
            enc: Any = self.inner
            x = nn.functional.gelu(enc.conv1(input_features))
            x = nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
            x = x + enc.embed_positions.weight[: x.shape[1]]
            for layer in enc.layers:
                x = layer(x, None)
            return BaseModelOutput(last_hidden_state=enc.layer_norm(x))

    encoder, _decoder = _modules(loaded)
    encoder.encoder = AnyFrames(loaded.model.model.encoder)
    return encoder


def cross_positions_dynamic(decoder: onnx.ModelProto) -> onnx.ModelProto:
    """The decoder with its cross-attention K/V inputs' position axis made symbolic."""
    for value in decoder.graph.input:
        if value.name.startswith("cross_"):
            # stacked [layers, batch, heads, positions, head_dim] or per layer [batch, ...]
            dim = value.type.tensor_type.shape.dim[3 if value.name in STACKED else 2]
            dim.Clear()
            dim.dim_param = "positions"
    return decoder


def write_run_folder(loaded: LoadedWhisper, export: Path, out: Path) -> None:
    """WORK/run: the dynamic-frames encoder, the decoder with a dynamic cross length, and
    the export's tokenizer and card (graph specs from the new files)."""
    import torch

    from sfc.atomic import staging_dir
    from sfc.card import ModelCard, graph_spec_from_onnx
    from sfc.models.whisper_export import DECODER_FILE, ENCODER_FILE, _export

    card = ModelCard.load(export)
    cfg = loaded.model.config
    with staging_dir(out) as stage, torch.no_grad():
        feats = torch.zeros(1, cfg.num_mel_bins, 2 * cfg.max_source_positions)
        _export(dynamic_encoder(loaded), (feats,), stage / ENCODER_FILE, ["input_features"],
                list(ENCODER_OUTPUTS),
                {"input_features": {0: "batch", 2: "frames"},
                 "last_hidden_state": {0: "batch", 1: "positions"},
                 "cross_key": {1: "batch", 3: "positions"},
                 "cross_value": {1: "batch", 3: "positions"}})
        onnx.save(cross_positions_dynamic(onnx.load(str(export / DECODER_FILE))),
                  str(stage / DECODER_FILE))
        graphs = {}
        for key, file in (("encoder", ENCODER_FILE), ("decoder", DECODER_FILE)):
            onnx.checker.check_model(str(stage / file))
            graphs[key] = graph_spec_from_onnx(onnx.load(str(stage / file),
                                                         load_external_data=False), file)
        shutil.copyfile(export / str(card.tokenizer), stage / str(card.tokenizer))
        replace(card, graphs=graphs,
                source={**card.source, "encoder_frames": "dynamic, benchmarks/short_window.py"}
                ).save(stage)


def check_parity(loaded: LoadedWhisper, export: Path, run_folder: Path, features: np.ndarray,
                 short_frames: int, threads: int) -> dict[str, Any]:
    """Max abs differences of the new encoder against the export's at the full window and
    against PyTorch at `short_frames`; an AssertionError over `PARITY_TOL`."""
    import torch

    from sfc.card import ModelCard
    from sfc.runtime.session import open_session

    def outputs(folder: Path, x: np.ndarray) -> list[np.ndarray]:
        path = folder / ModelCard.load(folder).graphs["encoder"].path
        return list(open_session(path, threads=threads).run(list(ENCODER_OUTPUTS),
                                                           {"input_features": x}))

    def diffs(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> dict[str, float]:
        return {n: float(np.max(np.abs(x - y))) for n, x, y in zip(ENCODER_OUTPUTS, a, b,
                                                                    strict=True)}

    short = np.ascontiguousarray(features[:, :, :short_frames])
    with torch.no_grad():
        reference = dynamic_encoder(loaded)(torch.from_numpy(short))
    report = {"frames": features.shape[-1], "short_frames": short_frames, "tol": PARITY_TOL,
              "vs_export_onnx": diffs(outputs(run_folder, features), outputs(export, features)),
              "vs_torch_short": diffs(outputs(run_folder, short),
                                      [t.numpy() for t in reference])}
    worst = max(max(report["vs_export_onnx"].values()), max(report["vs_torch_short"].values()))
    assert worst <= PARITY_TOL, f"dynamic encoder differs by {worst:.3g}: {report}"
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

    work = outside_repo(args.parser, args.work, REPO)
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
    run_folder = work / "run"
    write_run_folder(loaded, export, run_folder)
    probe = whisper_windows(load_audio(utterances[0].audio), mel)[:1]
    parity = check_parity(loaded, export, run_folder, probe, frames[windows[-1]],
                          args.threads)
    print(f"parity: max abs diff vs export encoder.onnx at {parity['frames']} frames "
          f"{parity['vs_export_onnx']}; vs PyTorch at {parity['short_frames']} frames "
          f"{parity['vs_torch_short']}", flush=True)

    runtimes = {w: WhisperRuntime.open(run_folder, threads=args.threads) for w in windows}
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
              "export": str(export), "run_folder": str(run_folder), "data": str(args.data),
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
    parser.add_argument("--work", type=Path, default=Path("/tmp/short_window"))
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
