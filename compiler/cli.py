"""The `sfc` command line: a thin typer layer over the Python API.

User errors (`SfcError`) print one line and exit 2; Ctrl-C exits 130 without a traceback
(with one line saying what was saved, when a long pass saved partial results). User data
(paths, transcripts, names) is printed as `rich.text.Text`, never read as rich markup.
Heavy modules (torch, onnxruntime) are imported inside commands, so `sfc transcribe`
never loads torch and `sfc --help` is fast.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .errors import Interrupted, SfcError
from .paths import BUNDLED_DATA

if TYPE_CHECKING:
    from .runtime.fallback import DecodeOptions

app = typer.Typer(
    name="sfc",
    help="Edge deployment compiler for speech foundation models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
_F = TypeVar("_F", bound=Callable[..., Any])


class _CtrlC(Exception):
    """Ctrl-C inside a command, carried to `main` as an ordinary exception: typer turns a
    KeyboardInterrupt into a bare return code when not standalone, losing the message."""


def command(name: str | None = None) -> Callable[[_F], _F]:
    """`app.command`, with Ctrl-C (and `Interrupted`'s message) passed on to `main`."""

    def register(fn: _F) -> _F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Interrupted as exc:
                raise _CtrlC(str(exc)) from None
            except KeyboardInterrupt:
                raise _CtrlC("interrupted; no partial outputs were written") from None

        app.command(name)(run)
        return fn

    return register


def _say(text: str, to: Console = console) -> None:
    """Print `text` as it is: as `Text` it is never read as markup or emoji codes, nor
    highlighted, and soft wrapping leaves long lines to the terminal."""
    to.print(Text(text), soft_wrap=True)


def _plain_row(table: Table, *cells: str) -> None:
    """Add a row of user data (paths, names) that the table must not read as markup."""
    table.add_row(*(Text(cell) for cell in cells))


def _print_version(value: bool) -> None:
    """`--version`: the installed distribution's version, then exit before any command."""
    if value:
        from importlib.metadata import version

        sys.stdout.write(f"sfc {version('sfc')}\n")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print sfc's version and exit")] = False) -> None:
    """Edge deployment compiler for speech foundation models."""


DEFAULT_MODEL = "whisper-tiny.en"
ModelArg = Annotated[str, typer.Argument(
    help="An sfc export/build folder, or a zoo name (exported to the cache on first use).")]
ThreadsOpt = Annotated[int | None, typer.Option(
    "--threads", min=1, help="ONNX Runtime intra-op threads (default: ORT's choice).")]
LanguageOpt = Annotated[str | None, typer.Option(
    "--language", help="Language spoken (a code: de, fr, ...; multilingual models); default: "
    "detected on each file's first 30 s (English-only models: en)")]
TaskOpt = Annotated[str, typer.Option(
    "--task", help="transcribe, or translate into English (multilingual models)")]
LoopGuardOpt = Annotated[bool, typer.Option(
    "--loop-guard/--no-loop-guard",
    help="End a window whose greedy decoding repeats one unit 4+ times over 24+ tokens, "
    "keeping one copy (default on)")]
BeamSizeOpt = Annotated[int, typer.Option(
    "--beam-size", help="Beam search with N beams (1: greedy, the default; ONNX Runtime "
    "decoders only)")]
EncoderWindowOpt = Annotated[str, typer.Option(
    "--encoder-window", help="full: the encoder sees Whisper's 30 s window (default); fit: a "
    "file of at most 30 s is encoded on its length plus 10 s (fit:pad=S,min=S: plus S "
    "seconds, at least S), faster on short files; transcripts change, about +0.5 WER points "
    "on tiny.en (BENCHMARKS.md, issue 13; ONNX Runtime only)")]
FallbackOpt = Annotated[bool, typer.Option(
    "--temperature-fallback/--no-temperature-fallback",
    help="OpenAI's fallback: re-decode a window whose text is repetitive (gzip ratio > 2.4, "
    "or the loop guard fired) or improbable (avg log-prob < -1) by seeded sampling at "
    "temperature 0.2, 0.4, ... 1.0; skip silent windows (default off)")]


def _decode_options(beam_size: int, fallback: bool, seed: int) -> DecodeOptions:
    """`DecodeOptions` from the command line; bad values fail here, before any loading."""
    from .runtime.fallback import DecodeOptions

    return DecodeOptions(beam_size=beam_size, fallback=fallback, seed=seed)


@command()
def export(
    src: Annotated[str, typer.Argument(help="Zoo name (whisper-tiny.en, whisper-base) or .onnx")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder")] = Path("out"),
) -> None:
    """Export FP32 ONNX graphs and a model card (card.json) into OUT."""
    from .models import export_source

    with console.status(Text(f"exporting {src}")):
        card = export_source(src, out)
    table = Table(title=Text(f"{card.name} -> {out}"))
    for col in ("graph", "file", "MB", "inputs", "outputs"):
        table.add_column(col)
    for key, g in card.graphs.items():
        size = (out / g.path).stat().st_size / 1e6
        _plain_row(table, key, g.path, f"{size:.1f}", ", ".join(t.name for t in g.inputs),
                   ", ".join(t.name for t in g.outputs))
    console.print(table)


@command()
def synth(
    out: Annotated[Path, typer.Option("-o", "--out", help="New manifest folder (required)")],
    texts: Annotated[Path, typer.Argument(help="Sentences, one per line ('#' lines skipped)")]
    = BUNDLED_DATA / "synth" / "texts.txt",
    held_out: Annotated[list[Path] | None, typer.Option(
        "--held-out", help="Evaluation manifests no sentence may come from (repeatable; "
        "default: the bundled eval set)")] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the per-sentence speaking rates")]
    = 0,
) -> None:
    """Render sentences to speech (piper-tts) as training audio for --train-data."""
    from .calib.synth import read_texts, synthesize

    sentences = read_texts(texts)
    folder = synthesize(sentences, out, held_out=held_out or [BUNDLED_DATA / "eval"],
                        seed=seed)
    _say(f"wrote {len(sentences)} clips and their manifest to {folder}")


# Tabs and line breaks inside a transcript would break the one-line-per-file contract.
_FLAT = str.maketrans("\t\r\n", "   ")


def _print_transcript(path: Path, text: str, several: bool) -> None:
    """One file's transcript on stdout. Piped: `text`, or `path<TAB>text` for several
    files, written as is for scripts; on a terminal: `path: text`, never read as markup."""
    if sys.stdout.isatty():
        _say(f"{path}: {text}" if several else text)
        return
    flat = text.translate(_FLAT)
    sys.stdout.write(f"{path}\t{flat}\n" if several else f"{flat}\n")
    sys.stdout.flush()  # a reader downstream gets each file as soon as it is decoded


def _output_paths(audio: list[Path], folder: Path, ext: str) -> list[Path]:
    """One output file per input in `folder`, named by the input's stem (stdin: `stdin`);
    two inputs that would write the same file are refused before any decoding."""
    from .runtime.audio import STDIN

    paths = [folder / f"{'stdin' if str(p) == STDIN else p.stem}.{ext}" for p in audio]
    seen: dict[Path, Path] = {}
    for src, dst in zip(audio, paths, strict=True):
        if dst in seen:
            raise SfcError(f"{seen[dst]} and {src} would both be written to {dst}; "
                           "give inputs with different names")
        seen[dst] = src
    return paths


@command()
def transcribe(
    model: ModelArg,
    audio: Annotated[list[Path], typer.Argument(
        help="Audio files (any rate; resampled); - reads one file from stdin")],
    threads: ThreadsOpt = None,
    loop_guard: LoopGuardOpt = True,
    batch: Annotated[int, typer.Option(
        min=1, help="Throughput mode: decode the windows of N files together")] = 1,
    output_format: Annotated[str, typer.Option(
        "--output-format", "-f", help="txt (text), or json, srt, vtt, tsv (segments from "
        "Whisper's timestamp tokens)")] = "txt",
    output_dir: Annotated[Path | None, typer.Option(
        "--output-dir", "-o", help="Write one file per input here (INPUT-STEM.FORMAT; stdin: "
        "stdin.FORMAT), each replaced only once complete; default: stdout")] = None,
    vad: Annotated[bool, typer.Option(
        "--vad/--no-vad", help="Decode windows of speech found by Silero VAD (pip install "
        "silero-vad), at most 30 s each, cut at pauses; default: --seek")]
    = False,
    seek: Annotated[bool | None, typer.Option(
        "--seek/--no-seek", help="Decode audio longer than 30 s (and any audio asked for "
        "timestamps) window after window, each window starting at the last complete segment "
        "of the one before, as OpenAI's and faster-whisper's decoders do (default); "
        "--no-seek: consecutive 30 s windows decoded independently")] = None,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", min=1, help="Windows decoded together (default: 8, or --batch if "
        "more)")] = None,
    language: LanguageOpt = None,
    task: TaskOpt = "transcribe",
    beam_size: BeamSizeOpt = 1,
    temperature_fallback: FallbackOpt = False,
    seed: Annotated[int, typer.Option(
        min=0, help="Seed of the temperature fallback's sampling (recorded in json output)")]
    = 0,
    encoder_window: EncoderWindowOpt = "full",
) -> None:
    """Print or write the transcript of each audio file."""
    from .atomic import write_text_atomic
    from .models import model_folder
    from .runtime.audio import STDIN, load_audio
    from .runtime.decoding import LOOP_GUARD, check_options
    from .runtime.subtitles import FORMATS
    from .runtime.vad import SileroVad
    from .runtime.whisper import WhisperRuntime
    from .runtime.window import EncoderWindow

    options = _decode_options(beam_size, temperature_fallback, seed)
    window = EncoderWindow.parse(encoder_window)
    if sum(str(p) == STDIN for p in audio) > 1:
        raise SfcError(f"{STDIN} (stdin) may be given once: stdin holds one audio file")
    if output_format not in FORMATS:
        raise SfcError(f"--output-format must be one of {', '.join(FORMATS)}, "
                       f"not {output_format!r}")
    fmt = FORMATS[output_format]
    if window.fit and (fmt.timestamps or vad):
        raise SfcError("--encoder-window fit applies to txt output without --vad: timestamps "
                       "and VAD windows keep Whisper's full 30 s window")
    if output_dir is None and output_format != "txt" and len(audio) > 1:
        raise SfcError(f"{output_format} for several files needs --output-dir (one file each)")
    targets = (_output_paths(audio, output_dir, output_format) if output_dir is not None
               else [None] * len(audio))
    # A missing package fails before loading.
    detector = SileroVad.open(threads=threads) if vad else None
    runtime = WhisperRuntime.open(model_folder(model), threads=threads,
                                  guard=LOOP_GUARD if loop_guard else None, options=options,
                                  window=window)
    language = check_options(runtime.decoding, language, task)  # before reading any audio
    runtime.max_batch = batch_size or max(runtime.max_batch, batch)
    for first in range(0, len(audio), batch):
        paths = audio[first:first + batch]
        outs = runtime.transcribe_many([load_audio(p) for p in paths], fmt.timestamps,
                                       detector, seek, language=language, task=task)
        for path, target, out in zip(paths, targets[first:first + batch], outs, strict=True):
            if target is not None:
                write_text_atomic(target, fmt.render(out))
                _say(f"wrote {target}", to=err_console)
            elif output_format == "txt":
                _print_transcript(path, out.text, several=len(audio) > 1)
            else:
                sys.stdout.write(fmt.render(out))
            if out.loop_stops:
                _say(f"{path}: decoding fell into a repetition loop in {out.loop_stops} "
                     "window(s); one copy kept", to=err_console)


@command("eval")
def eval_cmd(
    model: ModelArg = DEFAULT_MODEL,
    data: Annotated[Path, typer.Option(
        "--data", "--eval-data", help="Manifest folder or .jsonl")] = BUNDLED_DATA / "eval",
    json_out: Annotated[Path | None, typer.Option(
        "--json", help="Write the full result (per utterance) here (default: not written)")]
    = None,
    limit: Annotated[int | None, typer.Option(
        "--limit", "--eval-limit", min=1, help="Only the first N utterances")] = None,
    seed: Annotated[int, typer.Option(
        min=0, help="Seed of the bootstrap and of the temperature fallback's sampling")] = 0,
    threads: ThreadsOpt = None,
    loop_guard: LoopGuardOpt = True,
    language: Annotated[str, typer.Option(
        "--language", help="Language of the references (a code: en, de, ...), or auto: "
        "detected per file as `sfc transcribe` does")] = "en",
    task: TaskOpt = "transcribe",
    beam_size: BeamSizeOpt = 1,
    temperature_fallback: FallbackOpt = False,
    workers: Annotated[int | None, typer.Option(
        help="Transcribe on N workers of a local Ray (needs the ray package); the same "
             "transcripts, each worker's seconds at its share of the threads")] = None,
    ray_address: Annotated[str | None, typer.Option(
        help="Transcribe on the Ray cluster at auto or HOST:PORT (--workers: how many; "
             "default one per node); the model folder must be readable there")] = None,
    encoder_window: EncoderWindowOpt = "full",
    batch: Annotated[int, typer.Option(
        min=1, help="Throughput mode: transcribe N utterances together (their windows "
        "decoded together, as `sfc transcribe --batch`); each utterance's compute seconds "
        "are its batch's, split by audio length")] = 1,
) -> None:
    """WER (normalised, 95% bootstrap CI, per voice and condition) and real-time factor."""
    from .eval import evaluate, read_manifest, render
    from .eval.shards import Batched, TranscriberSpec
    from .executor import RayExecutor, check_ray_options
    from .models import model_folder
    from .runtime.decoding import LOOP_GUARD, check_options
    from .runtime.whisper import WhisperRuntime
    from .runtime.window import EncoderWindow

    window = EncoderWindow.parse(encoder_window)
    distributed = workers is not None or ray_address is not None
    if distributed and batch > 1:
        raise SfcError("--batch with --workers/--ray-address is not supported: choose "
                       "throughput mode in one process or Ray workers")
    if distributed:
        check_ray_options(workers, ray_address)
    options = _decode_options(beam_size, temperature_fallback, seed)
    utterances = read_manifest(data)
    if limit is not None:
        utterances = utterances[:limit]
    folder = model_folder(model)
    runtime = WhisperRuntime.open(folder, threads=threads,
                                  guard=LOOP_GUARD if loop_guard else None, options=options,
                                  window=window)
    chosen = check_options(runtime.decoding, None if language == "auto" else language, task)
    name = runtime.card.name
    if window.fit:  # the result says how it was decoded
        name += f" (encoder window {window})"
    executor: Batched | RayExecutor
    if distributed:
        spec = TranscriberSpec(folder.resolve(), loop_guard, options, chosen, task, window)
        del runtime  # the workers hold their own
        executor = RayExecutor(spec, address=ray_address, workers=workers)
    else:
        runtime.max_batch = max(runtime.max_batch, batch)  # as `sfc transcribe --batch`
        executor = Batched(lambda audios: runtime.transcribe_many(audios, language=chosen,
                                                                  task=task), batch)
    try:
        result = evaluate(None, utterances, model=name, data=str(data), seed=seed,
                          executor=executor, batch=batch)
    finally:
        executor.close()
    console.print(render(result))
    if json_out is not None:
        result.save(json_out)
        _say(f"per-utterance results: {json_out}")


def _weight_bits(weights: str) -> int | str:
    """--weights as BuildConfig takes it; `int4` and `4` name one format, as in
    --activations."""
    bare = weights.removeprefix("int")
    if bare in ("8", "4", "2"):
        return int(bare)
    if weights == "mixed":
        return weights
    raise SfcError(f"--weights must be 8, 4, 2 (int8, int4, int2) or mixed, not {weights!r}")


def _activation_bits(activations: str) -> int | None:
    """--activations as BuildConfig takes it (None: float); `int8` and `8` alike."""
    bits = {"8": 8, "4": 4, "none": None}
    bare = activations.removeprefix("int")
    if bare not in bits:
        raise SfcError(f"--activations must be int8, int4 (8, 4) or none, not {activations!r}")
    return bits[bare]


def _block_scale_bits(block_scales: str) -> int | None:
    """--block-scales as BuildConfig takes it (bits per stored scale; None: auto)."""
    bits = {"auto": None, "float32": 32, "fp32": 32, "float16": 16, "fp16": 16, "coded8": 8}
    if block_scales not in bits:
        raise SfcError(f"--block-scales must be auto, float32, float16 or coded8, not "
                       f"{block_scales!r}")
    return bits[block_scales]


@command("build")
def build_cmd(
    src: Annotated[str | None, typer.Argument(
        help="Zoo name, export folder or .onnx (default: the --recipe folder's model, else "
        f"{DEFAULT_MODEL})", show_default=False)] = None,
    out: Annotated[Path, typer.Option("-o", "--out", help="Build folder")] = Path("build"),
    target: Annotated[str, typer.Option(
        help="ort-cpu[:vnni|avx2|arm64] (integer kernels; default class: this CPU's), sim "
        "(fake-quant accuracy check, any bit-width) or tensorrt[:10.3|10.16|11]")]
    = "ort-cpu",
    weights: Annotated[str, typer.Option(
        help="Weight bits: 8, 4, 2 (int8, int4, int2 alike), or mixed (per layer from "
        "{8, 4, 2} under --avg-bits or --size-mb: sensitivity probes, then an integer "
        "program)")] = "8",
    weight_method: Annotated[str, typer.Option(
        help="How 4/2-bit weights are rounded: gptq (second-order, from the calibration "
        "inputs' Gram matrices; the default), mse (clipped scales, no data) or rtn "
        "(absmax)")] = "gptq",
    avg_bits: Annotated[float | None, typer.Option(
        help="Mixed: average weight bits, scales counted (INT4 block 32 = 5.0)")] = None,
    size_mb: Annotated[float | None, typer.Option(
        help="Mixed: total size of the model's initializers in MB")] = None,
    candidates: Annotated[str | None, typer.Option(
        help="Mixed: formats to choose from (default 8,4/32,4/128,2/32)")] = None,
    sensitivity: Annotated[str, typer.Option(
        help="Mixed: task (loss probes on the calibration set) or proxy (layer-output "
        "error, cheaper)")] = "task",
    sensitivity_samples: Annotated[int, typer.Option(
        help="Mixed: calibration items the task probes run on")] = 16,
    search: Annotated[str, typer.Option(
        help="Mixed: two-stage (sensitivity probes + integer program) or one-stage (bits "
        "learned with the weights by distillation; zoo Whisper models)")] = "two-stage",
    search_steps: Annotated[int | None, typer.Option(
        help="One-stage: joint search steps (4 clips each; default 200)")] = None,
    finetune_steps: Annotated[int | None, typer.Option(
        help="Mixed: distillation steps that fine-tune the weights with the bits fixed "
        "(one-stage: default 100; two-stage: default 0, none; zoo Whisper models)")] = None,
    finetune_objective: Annotated[str, typer.Option(
        help="One-stage and fine-tuning: kl (the teacher's next-token distribution) or "
        "blocks (each transformer block's output against the teacher's, on the teacher's "
        "input)")] = "kl",
    train_data: Annotated[list[Path] | None, typer.Option(
        help="One-stage and fine-tuning: more training audio, a manifest folder "
        "(repeatable; e.g. sfc synth's); the FP32 teacher labels it")] = None,
    train_device: Annotated[str, typer.Option(
        help="One-stage and fine-tuning: cpu (deterministic) or cuda (a GPU torch can "
        "see)")] = "cpu",
    precision: Annotated[Path | None, typer.Option(
        help="Per-layer precision map (JSON: node-name glob -> 8|4|2|float or "
        "{weights, block_size, activations}; a key GRAPH:glob applies to that graph "
        "only)")] = None,
    rotate: Annotated[list[str] | None, typer.Option(
        help="4/2-bit weights: read this graph's MatMul inputs through a seeded Hadamard "
        "rotation (signs and 32 x 32 blocks, kept float) and quantize the rotated weights; "
        "a graph name (e.g. decoder) or all, repeatable")] = None,
    gptq_damp: Annotated[float, typer.Option(help="GPTQ: dampening (fraction of mean "
                                             "diag H)")] = 0.01,
    gptq_act_order: Annotated[bool, typer.Option(help="GPTQ: walk inputs by decreasing "
                                                 "diag H (static groups)")] = True,
    gptq_stages: Annotated[int, typer.Option(
        help="GPTQ: groups of each graph's MatMuls calibrated one after another on the "
        "quantized outputs of those before them (1: one FP32 pass)")] = 1,
    gptq_tied: Annotated[str, typer.Option(
        help="A tied embedding/logits table: gptq, mse (MSE-clipped round-to-nearest), or "
        "auto (GPTQ only if it beats MSE on held-out calibration clips)")] = "auto",
    activations: Annotated[str, typer.Option(
        help="Activations: int8, int4 (fake-quant --target sim only) or none; 8 and 4 "
        "alike")] = "int8",
    calibrator: Annotated[str, typer.Option(
        help="max, percentile, entropy, mse, or esc (MSE start refined by CMA-ES against the "
        "task objective; the default: lossless W8A8 on whisper-tiny.en)")] = "esc",
    calib: Annotated[Path, typer.Option(help="Calibration manifest folder (or .npz folder)")]
    = BUNDLED_DATA / "calib",
    calib_limit: Annotated[int | None, typer.Option(
        min=1, help="Only the first N calibration items")]
    = None,
    recipe: Annotated[Path | None, typer.Option(help="Replay a build folder's recipes")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Keep matching nodes float (glob)")]
    = None,
    block_size: Annotated[int, typer.Option(help="Block size for 4/2-bit weights")] = 32,
    quantize_attention: Annotated[bool, typer.Option(help="Also quantize QK^T and AV")] = False,
    symmetric_blocks: Annotated[bool, typer.Option(
        help="No zero points in 4/2-bit blocks even where the target runs them (ort-cpu, "
             "sim); TensorRT's are always symmetric")] = False,
    block_scales: Annotated[str, typer.Option(
        help="How 4/2-bit block scales are stored: float16 (INT4 in blocks of 32 with zero "
             "points: 4.625 bits a weight), float32 (5.125), coded8 (8-bit codes times a "
             "float16 step per column: 4.375 + 16/K), or auto: float16 on ort-cpu, float32 "
             "on sim and TensorRT")]
    = "auto",
    seed: Annotated[int, typer.Option(min=0, help="Seed, recorded in the recipe")] = 0,
    esc_budget: Annotated[int, typer.Option(help="ESC: candidate evaluations")] = 100,
    esc_popsize: Annotated[int | None, typer.Option(
        help="ESC: CMA-ES population (default 4 + 3 ln n)")] = None,
    esc_samples: Annotated[int, typer.Option(
        help="ESC: calibration clips the objective runs on (Whisper: packed into windows, "
             "see --pack-clips)")] = 16,
    esc_objective: Annotated[str, typer.Option(
        help="ESC: auto (the model card's), teacher-forced, kl or distortion")] = "auto",
    pack_clips: Annotated[bool, typer.Option(
        help="ESC scores its calibration clips joined several to a 30 s Whisper window "
             "(the same speech in about a fifth of the encoder passes); --no-pack-clips: "
             "one clip per window")] = True,
    workers: Annotated[int | None, typer.Option(
        help="ESC's candidates and mixed precision's sensitivity probes on N workers of a "
             "local Ray (needs the ray package); the same recipe as in this process")] = None,
    ray_address: Annotated[str | None, typer.Option(
        help="ESC's candidates and the sensitivity probes on the Ray cluster at auto or "
             "HOST:PORT (--workers: how many; default one per node)")] = None,
    act_guard: Annotated[bool, typer.Option(
        help="Whisper, quantized activations: after calibration, keep in float the fewest "
        "activations that bring the KL that activation quantization adds within "
        "--act-guard-kl (leave-one-out probes; only when it is over)")] = True,
    act_guard_kl: Annotated[float | None, typer.Option(
        help="Activation guard: KL (nats per token, to FP32) that quantizing the "
        "activations may add to the quantized weights' own (default 0.005)")] = None,
    act_guard_max: Annotated[int | None, typer.Option(
        help="Activation guard: most activations kept in float (default 8)")] = None,
    act_guard_samples: Annotated[int | None, typer.Option(
        help="Activation guard: calibration clips its probes run on, after ESC's (default "
        "16; fewer: a faster guard on a noisier measurement)")] = None,
    smooth: Annotated[bool, typer.Option(
        help="Quantized activations: first move each MatMul input's channel ranges into "
        "its weights (SmoothQuant; folded into the LayerNorm or constant Mul that makes the "
        "input, exact in FP32; not with learned weights)")] = True,
    smooth_alpha: Annotated[float | None, typer.Option(
        help="Smoothing: share of the range moved into the weights, 0-1 (default 0.5)")]
    = None,
    smooth_clips: Annotated[int | None, typer.Option(
        help="Smoothing: first calibration clips the channel ranges are taken on (default "
        "32)")] = None,
    eval_data: Annotated[Path | None, typer.Option(
        "--eval-data", "--eval", help="WER check against FP32: manifest folder or .jsonl")]
    = BUNDLED_DATA / "eval",
    eval_limit: Annotated[int | None, typer.Option(
        min=1, help="Only the first N eval utterances")]
    = None,
    eval_batch: Annotated[int | None, typer.Option(
        min=1, help="WER check in throughput mode: N utterances decoded together, FP32 and "
        "build alike (as `sfc eval --batch`; default 8); 1: one at a time")] = None,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip the WER check")] = False,
    from_qdq: Annotated[Path | None, typer.Option(
        "--from-qdq", help="Only lower this QDQ / TensorRT-ready ONNX into OUT (finishes a "
        "TensorRT build on the device)")] = None,
    max_batch: Annotated[int, typer.Option(
        help="TensorRT: largest batch (Whisper: 30 s windows at once) the engines serve")] = 1,
    opt_batch: Annotated[int, typer.Option(help="TensorRT: batch the engines are tuned for")]
    = 1,
    max_decoder_steps: Annotated[int | None, typer.Option(
        help="TensorRT: most decoder positions (default: the card's max_target_positions)")]
    = None,
    opt_decoder_steps: Annotated[int, typer.Option(
        help="TensorRT: decoder positions the engine is tuned for")] = 64,
    dim: Annotated[list[str] | None, typer.Option(
        help="TensorRT: NAME=SIZE for another symbolic dimension (repeatable; default 1)")]
    = None,
    trt_float: Annotated[str, typer.Option(
        help="TensorRT: type of the float layers, fp16, bf16 (sm_80 on, e.g. Orin) or fp32; "
        "LayerNorm, softmax, reductions and logits stay fp32 by rule")] = "fp16",
    fused_attention: Annotated[bool, typer.Option(
        help="ort-cpu: float attention cores as ORT's fused MultiHeadAttention (faster "
        "encoder, less memory; not bit-exact)")] = False,
    threads: ThreadsOpt = None,
) -> None:
    """Quantize SRC to QDQ ONNX, lower it for TARGET, and report size, WER and kernels."""
    from .build import BuildConfig, lower_qdq, replay_source
    from .pipeline import WER_CHECK_BATCH, compile_model, pending_engines
    from .precision.data_parallel import env_world
    from .targets.tensorrt_plan import ProfileLimits

    limits = ProfileLimits(max_batch=max_batch, opt_batch=opt_batch,
                           max_decoder_steps=max_decoder_steps,
                           opt_decoder_steps=opt_decoder_steps,
                           dims=ProfileLimits.parse_dims(dim or ()))
    if from_qdq is not None:
        result = lower_qdq(from_qdq, out, target, limits, trt_float, fused_attention)
        for note in result.notes:
            _say(f"- {note}")
        if not (out / result.artifact).is_file():
            raise SfcError(f"{out / result.artifact} was not built: TensorRT is not installed "
                           "here (run this inside the docker/tensorrt image or on the device)")
        _say(f"wrote {out / result.artifact} ({result.bytes / 1e6:.1f} MB)")
        return

    from .precision.activations import GuardConfig
    from .precision.budget import Budget
    from .precision.mapfile import load_precision
    from .precision.onestage import OneStageConfig, check_device
    from .precision.search import DEFAULT_CANDIDATES, SearchConfig
    from .quant.gptq import GptqConfig
    from .quant.smooth import SmoothConfig

    act_bits = _activation_bits(activations)
    bits = _weight_bits(weights)
    mixed = None
    if search_steps is not None and search != "one-stage":
        raise SfcError("--search-steps applies to --search one-stage only")
    # Two-stage fine-tunes only when asked, at the rate the benchmarks measured.
    finetune = None if search == "one-stage" or not finetune_steps else OneStageConfig(
        steps=0, finetune_steps=finetune_steps, seed=seed, device=train_device,
        finetune_schedule="constant", objective=finetune_objective)
    for flag, value, default in (("--train-device", train_device, "cpu"),
                                 ("--finetune-objective", finetune_objective, "kl")):
        if value != default and search != "one-stage" and finetune is None:
            raise SfcError(f"{flag} applies to --search one-stage and to --finetune-steps "
                           "only")
    if avg_bits is not None or size_mb is not None or weights == "mixed":
        if weights != "mixed":
            raise SfcError("--avg-bits and --size-mb apply to --weights mixed only")
        formats = tuple(c.strip() for c in candidates.split(",")) if candidates else \
            DEFAULT_CANDIDATES
        mixed = SearchConfig(Budget(avg_bits, size_mb), formats, sensitivity,
                             sensitivity_samples, search,
                             OneStageConfig(
                                 steps=OneStageConfig.steps if search_steps is None
                                 else search_steps,
                                 finetune_steps=OneStageConfig.finetune_steps
                                 if finetune_steps is None else finetune_steps,
                                 seed=seed, device=train_device,
                                 objective=finetune_objective), finetune)
        if mixed.learning is not None:
            check_device(train_device)
        if search == "one-stage" and search_steps == 0 and len(formats) != 1:
            raise SfcError("--search-steps 0 (fine-tuning only) needs exactly one "
                           "--candidates format")
    elif candidates is not None or search != "two-stage" or finetune_steps is not None:
        raise SfcError("--candidates, --search and --finetune-steps apply to --weights mixed "
                       "only")
    gptq = GptqConfig(damp=gptq_damp, act_order=gptq_act_order, stages=gptq_stages,
                      tied=gptq_tied)
    guard = GuardConfig() if act_guard else None
    if act_guard_kl is not None or act_guard_max is not None or act_guard_samples is not None:
        if guard is None:
            raise SfcError("--act-guard-kl, --act-guard-max and --act-guard-samples apply "
                           "with --act-guard only")
        guard = GuardConfig(guard.allowance if act_guard_kl is None else act_guard_kl,
                            guard.max_float if act_guard_max is None else act_guard_max,
                            guard.samples if act_guard_samples is None else act_guard_samples)
    smoothing = SmoothConfig() if smooth else None
    if smooth_alpha is not None or smooth_clips is not None:
        if smoothing is None:
            raise SfcError("--smooth-alpha and --smooth-clips apply with --smooth only")
        smoothing = SmoothConfig(smoothing.alpha if smooth_alpha is None else smooth_alpha,
                                 smoothing.clips if smooth_clips is None else smooth_clips)
    config = BuildConfig(target=target, weights=bits, activations=act_bits,
                         weight_method=weight_method, gptq=gptq, search=mixed,
                         precision=load_precision(precision) if precision else (),
                         calibrator=calibrator, calib=calib, calib_limit=calib_limit,
                         recipe=recipe, exclude=tuple(exclude or ()), block_size=block_size,
                         quantize_attention=quantize_attention,
                         symmetric_blocks=symmetric_blocks,
                         block_scale_bits=_block_scale_bits(block_scales), seed=seed,
                         esc_budget=esc_budget, esc_popsize=esc_popsize,
                         esc_samples=esc_samples, esc_objective=esc_objective,
                         pack_clips=pack_clips, workers=workers, ray_address=ray_address,
                         act_guard=guard, smooth=smoothing, engine_limits=limits,
                         trt_float=trt_float,
                         fused_attention=fused_attention, train_data=tuple(train_data or ()),
                         rotate=tuple(rotate or ()))
    src = src or (replay_source(recipe) if recipe else None) or DEFAULT_MODEL
    report = compile_model(src, out, config, eval_data=None if no_eval else eval_data,
                           eval_limit=eval_limit, threads=threads,
                           eval_batch=eval_batch or WER_CHECK_BATCH)
    if env_world().rank > 0:
        return  # under torchrun rank 0 reports the build; this rank's copy is gone
    _say((out / "report.md").read_text().split("\n## Layers")[0])
    _say(f"build folder: {out} (report.md, report.json); "
         f"{report.compression:.2f}x smaller than FP32")
    pending = pending_engines(report)
    if pending:  # the QDQ/TensorRT-ready ONNX is written; the engines need TensorRT
        raise SfcError(f"TensorRT is not installed here, so {out} holds the TensorRT-ready "
                       "ONNX but no engine; finish on the device (or in docker/tensorrt): "
                       f"cd {out} && " + " && ".join(pending))


@command()
def bench(
    artifacts: Annotated[list[Path] | None, typer.Argument(
        help="Build/export folders or .onnx files")] = None,
    device: Annotated[str, typer.Option(
        help="cpu; cuda (TensorRT engine folders, or ONNX Runtime's CUDA provider; CUDA-event "
        "timing, NVML memory and clocks); jetson (as cuda, plus tegrastats RAM, GPU/EMC load, "
        "power and energy per utterance, L4T release, nvpmodel mode)")] = "cpu",
    baseline: Annotated[str | None, typer.Option(
        help="Baseline folder or zoo name (default: the FP32 zoo export for Whisper)")] = None,
    threads: ThreadsOpt = None,
    runs: Annotated[int, typer.Option(help="Timed runs per round")] = 20,
    rounds: Annotated[int, typer.Option(help="Interleaved rounds (one process each)")] = 3,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here")]
    = None,
    host: Annotated[str | None, typer.Option(
        help="Run on USER@HOST over SSH (artifacts are copied there by content; the table is "
        "made here)")] = None,
    ssh_key: Annotated[Path | None, typer.Option(
        help="SSH private key file (default: ssh-agent and ~/.ssh keys)")] = None,
    ssh_port: Annotated[int | None, typer.Option(
        help="SSH port (default: ~/.ssh/config or 22)")] = None,
    known_hosts: Annotated[Path | None, typer.Option(
        help="known_hosts file (default ~/.ssh/known_hosts)")] = None,
    insecure_no_host_check: Annotated[bool, typer.Option(
        "--insecure-no-host-check", help="Accept any host key (lab machines only)")] = False,
    remote_python: Annotated[str, typer.Option(
        help="Python with sfc on the host (absolute, or relative to the login directory)")]
    = "python3",
    docker_image: Annotated[str | None, typer.Option(
        help="With --host: run the worker in this Docker image on the host")] = None,
    trtexec_log: Annotated[Path | None, typer.Option(
        "--trtexec-log", help="Print the performance summary of a trtexec log instead "
        "(TensorRT 8.4-10.x; --json writes it)")] = None,
) -> None:
    """Latency percentiles, throughput, peak RSS, bytes and RTF, side by side with FP32."""
    import shlex

    from .bench import bench as run_bench
    from .bench.devices import Device, get_device
    from .bench.results import render as render_bench
    from .card import CARD_NAME, ModelCard
    from .models import ZOO, model_folder

    if trtexec_log is not None:
        from .atomic import write_json_atomic
        from .bench.trtexec import load_trtexec, render_trtexec

        if artifacts:
            raise SfcError("--trtexec-log reads a log: give it without artifacts")
        summary = load_trtexec(trtexec_log)
        console.print(render_trtexec(summary, title=Text(f"trtexec: {trtexec_log.name}")))
        if json_out is not None:
            write_json_atomic(json_out, summary.to_dict())
            _say(f"trtexec summary: {json_out}")
        return
    artifacts = artifacts or []
    if host is None and (docker_image or ssh_key or ssh_port or known_hosts
                         or insecure_no_host_check or remote_python != "python3"):
        raise SfcError("--ssh-key, --ssh-port, --known-hosts, --insecure-no-host-check, "
                       "--remote-python and --docker-image apply with --host only")
    dev: str | Device = device
    if host is not None:
        dev = get_device(device, host=host, port=ssh_port, key=ssh_key,
                         known_hosts=known_hosts, check_host_key=not insecure_no_host_check,
                         python=tuple(shlex.split(remote_python)), docker_image=docker_image)

    base = model_folder(baseline) if baseline else None
    names = {ModelCard.load(a).name for a in artifacts if (a / CARD_NAME).is_file()}
    if base is None and len(names) == 1 and (name := names.pop()) in ZOO:
        base = model_folder(name)  # builds of a zoo model are compared with its FP32 export
    report = run_bench(artifacts, device=dev, threads=threads, runs=runs, rounds=rounds,
                       baseline=base, console=err_console)
    console.print(render_bench(report))
    if json_out is not None:
        report.save(json_out)
        _say(f"bench report: {json_out}")


@command()
def info(json_: Annotated[bool, typer.Option("--json", help="Print JSON")] = False) -> None:
    """What is installed: ONNX Runtime providers, TensorRT/CUDA, CPU features, zoo packages."""
    from .info import machine_info
    from .targets.ort_cpu import ISAS

    mi = machine_info()
    if json_:
        console.print_json(json.dumps(mi.to_dict()))
        return
    table = Table(title="sfc info", show_header=False)
    _plain_row(table, "python", f"{mi.python} ({mi.platform})")
    _plain_row(table, "cpu", f"{mi.cpu}, {mi.cores} cores")
    _plain_row(table, "cpu features", " ".join(mi.cpu_flags) or "-")
    _plain_row(table, "ort-cpu class", f"{mi.ort_cpu_class}: {ISAS[mi.ort_cpu_class]}")
    _plain_row(table, "onnxruntime providers", ", ".join(mi.onnxruntime_providers))
    _plain_row(table, "tensorrt", mi.tensorrt or "not installed (TensorRT targets unavailable)")
    _plain_row(table, "cuda gpu", mi.cuda_gpu or "none found (no nvidia-smi)")
    for name, version in mi.packages.items():
        _plain_row(table, name, version or "-")
    _plain_row(table, "bundled data", mi.data)
    _plain_row(table, "cache ($SFC_CACHE)", mi.cache)
    for name, z in mi.zoo.items():
        where = ", ".join(z.checkpoint) or "package missing"
        _plain_row(table, f"zoo: {name}",
                   where + (" (exported in the cache)" if z.exported else ""))
    console.print(table)


@command("check")
def check_cmd(
    model: Annotated[Path, typer.Argument(
        help="A QDQ ONNX file (e.g. build/encoder/model.qdq.onnx)")],
    target: Annotated[str, typer.Option(
        help="tensorrt:10.3 (JetPack 6), tensorrt:10.16 (JetPack 7.2), tensorrt:11, ort-cpu or "
        "ort-cpu:avx2 (x86 without VNNI)")],
    arch: Annotated[str | None, typer.Option(
        help="Compute capability to assume instead of the target's device (sm_87 Orin, "
        "sm_110 Thor, sm_90 H100)")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here")]
    = None,
) -> None:
    """Check a QDQ ONNX file statically against what a runtime version accepts.

    One line per finding, then a summary; exit code 1 when any finding is an error.
    """
    from .check import check_model

    report = check_model(model, target, arch=arch)
    for finding in report.findings:
        _say(finding.line())
    _say(report.summary())
    if json_out is not None:
        report.save(json_out)
        _say(f"check report: {json_out}")
    if not report.passed:  # SystemExit: main() runs typer non-standalone, so Exit is swallowed
        raise SystemExit(1)


def main() -> None:
    """Entry point: run the app, turning user errors into one line and a non-zero exit."""
    try:
        app(standalone_mode=False)
    except SfcError as exc:
        # The message carries user data (paths): only the label is styled.
        err_console.print(Text.assemble(("error:", "bold red"), f" {exc}"), soft_wrap=True)
        sys.exit(2)
    except _CtrlC as exc:
        _say(str(exc), to=err_console)
        sys.exit(130)
    except KeyboardInterrupt:  # outside a command (while parsing options)
        _say("interrupted; no partial outputs were written", to=err_console)
        sys.exit(130)
    except (typer.Abort, typer.Exit) as exc:
        sys.exit(getattr(exc, "exit_code", 1))
    except Exception as exc:
        # Usage errors come from the click that typer vendors; recognise them by shape.
        show, code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            sys.exit(code)
        raise


if __name__ == "__main__":
    main()
