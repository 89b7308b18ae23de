"""The `sfc` command line: a thin typer layer over the Python API.

User errors (`SfcError`) print one line and exit 2; Ctrl-C exits 130 without a traceback.
Heavy modules (torch, onnxruntime) are imported inside commands, so `sfc transcribe`
never loads torch and `sfc --help` is fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .errors import SfcError
from .paths import BUNDLED_DATA

app = typer.Typer(
    name="sfc",
    help="Edge deployment compiler for speech foundation models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

DEFAULT_MODEL = "whisper-tiny.en"
ModelArg = Annotated[str, typer.Argument(
    help="An sfc export/build folder, or a zoo name (exported to the cache on first use).")]
ThreadsOpt = Annotated[int | None, typer.Option(
    "--threads", help="ONNX Runtime intra-op threads (default: ORT's choice).")]


@app.command()
def export(
    src: Annotated[str, typer.Argument(help="Zoo name (whisper-tiny.en, whisper-base) or .onnx")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder")] = Path("out"),
) -> None:
    """Export FP32 ONNX graphs and a model card (card.json) into OUT."""
    from .models import export_source

    with console.status(f"exporting {src}"):
        card = export_source(src, out)
    table = Table(title=f"{card.name} -> {out}")
    for col in ("graph", "file", "MB", "inputs", "outputs"):
        table.add_column(col)
    for key, g in card.graphs.items():
        size = (out / g.path).stat().st_size / 1e6
        table.add_row(key, g.path, f"{size:.1f}", ", ".join(t.name for t in g.inputs),
                      ", ".join(t.name for t in g.outputs))
    console.print(table)


@app.command()
def transcribe(
    model: ModelArg,
    audio: Annotated[list[Path], typer.Argument(help="Audio files (any rate; resampled)")],
    threads: ThreadsOpt = None,
) -> None:
    """Print the transcript of each audio file."""
    from .models import model_folder
    from .runtime.audio import load_audio
    from .runtime.whisper import WhisperRuntime

    runtime = WhisperRuntime.open(model_folder(model), threads=threads)
    for path in audio:
        text = runtime.transcribe(load_audio(path))
        console.print(f"{path}: {text}" if len(audio) > 1 else text, highlight=False)


@app.command("eval")
def eval_cmd(
    model: ModelArg = DEFAULT_MODEL,
    data: Annotated[Path, typer.Option(help="Manifest folder or .jsonl")] = BUNDLED_DATA / "eval",
    json_out: Annotated[Path | None, typer.Option(
        "--json", help="Write the full result (per utterance) here; default MODEL/eval.json "
        "for folders")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N utterances")] = None,
    seed: Annotated[int, typer.Option(help="Bootstrap seed")] = 0,
    threads: ThreadsOpt = None,
) -> None:
    """WER (normalised, 95% bootstrap CI, per voice and condition) and real-time factor."""
    from .eval import evaluate, read_manifest, render
    from .models import model_folder
    from .runtime.whisper import WhisperRuntime

    utterances = read_manifest(data)
    if limit is not None:
        utterances = utterances[:limit]
    folder = model_folder(model)
    runtime = WhisperRuntime.open(folder, threads=threads)
    result = evaluate(runtime.transcribe, utterances, model=runtime.card.name, data=str(data),
                      seed=seed)
    console.print(render(result))
    target = json_out or folder / "eval.json"
    result.save(target)
    console.print(f"per-utterance results: {target}")


@app.command()
def info(json_: Annotated[bool, typer.Option("--json", help="Print JSON")] = False) -> None:
    """What is installed: ONNX Runtime providers, TensorRT/CUDA, CPU features, zoo packages."""
    from .info import machine_info

    mi = machine_info()
    if json_:
        console.print_json(json.dumps(mi.to_dict()))
        return
    table = Table(title="sfc info", show_header=False)
    table.add_row("python", f"{mi.python} ({mi.platform})")
    table.add_row("cpu", f"{mi.cpu}, {mi.cores} cores")
    table.add_row("cpu features", " ".join(mi.cpu_flags) or "-")
    table.add_row("onnxruntime providers", ", ".join(mi.onnxruntime_providers))
    table.add_row("tensorrt", mi.tensorrt or "not installed (TensorRT targets unavailable)")
    table.add_row("cuda gpu", mi.cuda_gpu or "none found (no nvidia-smi)")
    for name, version in mi.packages.items():
        table.add_row(name, version or "-")
    for name, ok in mi.zoo.items():
        table.add_row(f"zoo: {name}", "installed" if ok else "package missing")
    console.print(table)


def main() -> None:
    """Entry point: run the app, turning user errors into one line and a non-zero exit."""
    try:
        app(standalone_mode=False)
    except SfcError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted; no partial outputs were written")
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
