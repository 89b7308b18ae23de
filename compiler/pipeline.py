"""`sfc build` end to end: build, judge the result through the same runtime, report."""

from __future__ import annotations

import time
from pathlib import Path

from .build import BuildConfig, build
from .card import ModelCard
from .eval import evaluate, read_manifest
from .eval.results import EvalResult
from .report import BuildReport, WerComparison, compare_wer, fp32_eval, make_report

__all__ = ["compile_model"]


def _evaluate_folder(folder: Path, data: Path, limit: int | None, threads: int | None,
                     label: str) -> EvalResult:
    from .runtime.whisper import WhisperRuntime

    runtime = WhisperRuntime.open(folder, threads=threads)
    utterances = read_manifest(data)[:limit]
    return evaluate(runtime.transcribe, utterances, model=label, data=str(data))


def compile_model(src: str, out: Path, config: BuildConfig, *, eval_data: Path | None,
                  eval_limit: int | None = None, threads: int | None = None) -> BuildReport:
    """Build `src` into `out`, evaluate it against FP32 (Whisper), write report.json/.md."""
    from .models import model_folder

    start = time.perf_counter()
    card, graphs = build(src, out, config)
    build_s = time.perf_counter() - start
    wer: WerComparison | None = None
    if card.family == "whisper" and eval_data is not None:
        fp32_folder = model_folder(src)
        fp32 = fp32_eval(fp32_folder, eval_data, eval_limit,
                         lambda: _evaluate_folder(fp32_folder, eval_data, eval_limit, threads,
                                                  f"{card.name} fp32"))
        built = _evaluate_folder(out, eval_data, eval_limit, threads, f"{card.name} build")
        built.save(out / "eval.json")
        wer = compare_wer(fp32, built)
    report = make_report(src, config, out, graphs, wer, build_s)
    report.save(out)
    ModelCard.load(out)  # the folder must stay loadable as a deployable
    return report
