"""`sfc build` end to end: build, judge the result through the same runtime, report."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from .atomic import staging_dir
from .build import BuildConfig, build
from .calib.feeds import Feed
from .calib.inferred_feeds import FeedSource, feed_source
from .card import ModelCard, TensorSpec
from .errors import SfcError
from .eval import evaluate, read_manifest
from .eval.results import EvalResult
from .eval.shards import Batched
from .memory import peak_rss_kib, release_free_memory
from .report import (
    BuildReport,
    Distortion,
    WerComparison,
    compare_wer,
    fp32_eval,
    make_report,
)

__all__ = ["WER_CHECK_BATCH", "compile_model"]

# The WER check decodes 8 utterances together: on the default tiny.en build the same 350
# transcripts as one at a time, 1.13-1.22x sooner (BENCHMARKS.md, issue 13).
WER_CHECK_BATCH = 8


def _evaluate_folder(folder: Path, data: Path, limit: int | None, threads: int | None,
                     label: str, batch: int = 1) -> EvalResult:
    """`folder`'s evaluation on `data`, `batch` utterances transcribed together."""
    from .runtime.whisper import WhisperRuntime

    runtime = WhisperRuntime.open(folder, threads=threads)
    runtime.max_batch = max(runtime.max_batch, batch)
    utterances = read_manifest(data)[:limit]
    # The references are English (the bundled sets): no language detection, whose rare
    # misses (an accented English clip taken for Japanese) are not what a build changes.
    executor = Batched(lambda audios: runtime.transcribe_many(audios, language="en"), batch)
    return evaluate(None, utterances, model=label, data=str(data), executor=executor,
                    batch=batch)


def measure_distortion(fp32_model: Path, artifact: Path, feeds: Iterable[Feed],
                       optimization: str = "all") -> Distortion:
    """Run FP32 and the built artifact on every feed; compare their outputs."""
    import numpy as np

    from .runtime.session import open_session

    ref, built = open_session(fp32_model), open_session(artifact, optimization=optimization)
    names = [o.name for o in ref.get_outputs()]
    rel: dict[str, list[float]] = {n: [] for n in names}
    cos: dict[str, list[float]] = {n: [] for n in names}
    for feed in feeds:
        for name, a, b in zip(names, ref.run(None, feed), built.run(None, feed), strict=True):
            a64 = np.asarray(a, np.float64).ravel()
            b64 = np.asarray(b, np.float64).ravel()
            norm = float(np.linalg.norm(a64))
            rel[name].append(float(np.linalg.norm(a64 - b64)) / norm if norm else 0.0)
            denom = norm * float(np.linalg.norm(b64))
            cos[name].append(float(a64 @ b64) / denom if denom else 1.0)
    n = len(next(iter(rel.values())))
    return Distortion(feeds=n, rel_l2={k: float(np.mean(v)) for k, v in rel.items()},
                      cosine={k: float(np.mean(v)) for k, v in cos.items()})


def _distortion_feeds(fp32_model: Path, inputs: Sequence[TensorSpec],
                      folders: list[tuple[Path | None, int | None]]) -> FeedSource | None:
    """The first of `folders` (held-out data first) that gives feeds, if any."""
    for folder, limit in folders:
        if folder is not None and Path(folder).is_dir():
            source = feed_source(Path(folder), fp32_model, inputs, limit)
            if isinstance(source, FeedSource):
                return source
    return None


def compile_model(src: str, out: Path, config: BuildConfig, *, eval_data: Path | None,
                  eval_limit: int | None = None, threads: int | None = None,
                  eval_batch: int = WER_CHECK_BATCH) -> BuildReport:
    """Build `src` into `out`, evaluate it against FP32 (Whisper), write report.json/.md.

    `eval_batch`: the WER check's utterances transcribed together (throughput mode), FP32
    and build alike.

    Under torchrun (WORLD_SIZE > 1; `precision.data_parallel`) only a one-stage search runs
    in parallel: rank 0 builds into `out`, the other ranks the same build into a temporary
    folder, removed, with no WER check."""
    from .precision.data_parallel import env_world

    world = env_world()
    if world.parallel and not config.one_stage:
        raise SfcError("under torchrun (WORLD_SIZE > 1) sfc runs only --search one-stage in "
                       "parallel; run other builds as one process")
    if world.rank == 0:
        return _compile_model(src, out, config, eval_data, eval_limit, threads, eval_batch)
    with tempfile.TemporaryDirectory(prefix=f"sfc-rank{world.rank}-") as scratch:
        return _compile_model(src, Path(scratch) / "build", config, None, None, threads)


def _compile_model(src: str, out: Path, config: BuildConfig, eval_data: Path | None,
                   eval_limit: int | None, threads: int | None,
                   eval_batch: int = WER_CHECK_BATCH) -> BuildReport:
    """`compile_model`'s build in this process."""
    from .models import export_peak_mib, model_folder, zoo_export_cached

    # One staging folder for the build, its WER check and its report, published together:
    # a run killed at any point (during the minutes of the WER check too) leaves the
    # earlier build folder as it was, never new models beside an old report.
    with staging_dir(out) as stage:
        start = time.perf_counter()
        exports_here = not zoo_export_cached(src)
        made = build(src, out, config, into=stage)
        card, graphs, config = made.card, made.graphs, made.config
        build_s = time.perf_counter() - start
        release_free_memory()  # the WER check's runtimes then start from a small footprint
        wer: WerComparison | None = None
        # A TensorRT build on a machine without TensorRT stops before the engines: nothing
        # to run.
        runnable = all((stage / g.name / g.lowering.artifact).is_file() for g in graphs)
        if card.family == "whisper" and eval_data is not None and runnable:
            fp32_folder = model_folder(src)
            fp32 = fp32_eval(fp32_folder, eval_data, eval_limit,
                             lambda: _evaluate_folder(fp32_folder, eval_data, eval_limit,
                                                      threads, f"{card.name} fp32",
                                                      eval_batch), eval_batch)
            built = _evaluate_folder(stage, eval_data, eval_limit, threads, f"{card.name} build",
                                     eval_batch)
            built.save(stage / "eval.json")
            wer = compare_wer(fp32, built)
        distortion = None
        if card.family != "whisper" and runnable:
            graph = graphs[0]
            source = _distortion_feeds(stage / graph.fp32, card.graphs[graph.name].inputs,
                                       [(eval_data, eval_limit), (config.calib, None)])
            if source is not None:
                distortion = measure_distortion(
                    stage / graph.fp32, stage / graph.name / graph.lowering.artifact,
                    source.make(), graph.lowering.optimization)
        export_peak = export_peak_mib(model_folder(src)) if exports_here and zoo_export_cached(
            src) else None
        report = make_report(src, config, stage, graphs, wer, build_s, distortion,
                             peak_rss_kib() / 1024, export_peak)
        report.save(stage)
        ModelCard.load(stage)  # the folder must stay loadable as a deployable
    return report


def pending_engines(report: BuildReport) -> list[str]:
    """Commands (run inside the build folder) that build the engines left to the device."""
    from .targets.tensorrt import PENDING

    return [n.removeprefix(PENDING) for g in report.graphs
            for n in g["lowering"].get("notes", ()) if n.startswith(PENDING)]
