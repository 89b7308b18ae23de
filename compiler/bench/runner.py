"""Benchmark artifacts against each other: separate processes, interleaved rounds, medians.

Timing noise on a small CPU is large (±30% between runs on 2 cores), so each variant runs in
its own process, variants take turns within each round (A B, then B A, ...: alternating
the order cancels a linear drift such as heating or a neighbour's load), and every ratio to
the baseline is taken within one round before the median over rounds.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from rich.console import Console

from ..card import CARD_NAME, ModelCard
from ..errors import SfcError
from ..paths import BUNDLED_DATA
from ..progress import progress_bar
from ..targets.base import artifact_bytes
from .backends import check_runs_on
from .devices import Device, call_worker, get_device
from .results import BenchReport, WorkerArgs, WorkerResult, summarize_variant

__all__ = ["artifact_kind", "artifact_size", "bench", "default_clips"]

logger = logging.getLogger(__name__)

DEFAULT_CLIP_COUNT = 4
# A load average above this share of the cores means something else competes for the CPU.
_BUSY_SHARE = 0.25


def default_clips(n: int = DEFAULT_CLIP_COUNT) -> tuple[Path, ...]:
    """The first `n` clips of the bundled evaluation set (real speech, 3-7 s each)."""
    from ..eval import read_manifest

    return tuple(u.audio for u in read_manifest(BUNDLED_DATA / "eval")[:n])


def artifact_kind(path: Path) -> str:
    """"whisper" for a Whisper export/build folder, else "generic"."""
    if path.is_dir() and ModelCard.load(path).family == "whisper":
        return "whisper"
    return "generic"


def artifact_size(path: Path) -> int:
    """Bytes a deployment ships: a folder's graph files per its card (with external data),
    or the file's size."""
    path = Path(path)
    if path.is_dir():
        card = ModelCard.load(path)
        return sum(artifact_bytes(path / g.path) for g in card.graphs.values())
    return artifact_bytes(path)


def _check_artifact(path: Path) -> Path:
    if path.is_dir():
        if not (path / CARD_NAME).is_file():
            raise SfcError(f"{path} has no {CARD_NAME}; benchmark an sfc folder or an .onnx file")
    elif not path.is_file():
        raise SfcError(f"artifact not found: {path}")
    elif path.suffix == ".plan":
        raise SfcError(f"{path}: benchmark a TensorRT engine through its build folder, whose "
                       "card.json gives its inputs")
    elif path.suffix not in (".onnx", ".ort"):
        raise SfcError(f"{path} is not an .onnx or .ort file")
    return path


def _labels(paths: Sequence[Path]) -> list[str]:
    """Readable unique labels: the file or folder name, numbered when names repeat."""
    labels: list[str] = []
    for name in (p.name for p in paths):
        label, k = name, 2
        while label in labels:
            label, k = f"{name}#{k}", k + 1
        labels.append(label)
    return labels


def _busy_warning(info: Mapping[str, object]) -> str | None:
    """A warning when the 1-minute load average says other processes use the CPU."""
    load, cores = info.get("loadavg"), info.get("cores")
    if not (isinstance(load, list) and load and isinstance(cores, int) and cores > 0):
        return None
    if float(load[0]) <= _BUSY_SHARE * cores:
        return None
    return (f"load average {float(load[0]):.2f} on {cores} cores before the run: "
            "other processes compete for the CPU; timings are noisy")


def bench(
    artifacts: Sequence[Path],
    *,
    device: str | Device = "cpu",
    threads: int | None = None,
    runs: int = 20,
    warmup: int = 3,
    rounds: int = 3,
    clips: Sequence[Path] = (),
    baseline: Path | None = None,
    inputs: Path | None = None,
    dims: Mapping[str, int] | None = None,
    seed: int = 0,
    progress: bool = True,
    console: Console | None = None,
    timeout_s: float | None = 1800.0,
) -> BenchReport:
    """Benchmark `artifacts` (and `baseline`, first) on `device`; return the report.

    Each artifact is a Whisper/generic folder with a card (TensorRT engine folders only on
    a cuda or jetson device), or an .onnx / .ort file. Whisper folders are timed on `clips`
    (default: a few bundled evaluation clips); other artifacts on `inputs` (.npz) or random
    inputs with symbolic dims from `dims` (else 1). Every (round, variant) pair is one
    worker process; `timeout_s` bounds each. `progress` shows a rich progress bar on
    `console` (default: rich's stdout console).

    Raises:
        SfcError: bad settings, a missing artifact or clip, an unknown device or one that
            lacks what its kind needs, or a worker that failed (its message is kept).
    """
    if runs < 1 or warmup < 0 or rounds < 1:
        raise SfcError(f"need runs >= 1, warmup >= 0, rounds >= 1 "
                       f"(got {runs}, {warmup}, {rounds})")
    if threads is not None and threads < 1:
        raise SfcError(f"threads must be >= 1 (got {threads})")
    dev = get_device(device) if isinstance(device, str) else device
    paths = [_check_artifact(Path(p)) for p in artifacts]
    if baseline is not None:
        paths.insert(0, _check_artifact(Path(baseline)))
    if not paths:
        raise SfcError("nothing to benchmark: give at least one artifact")
    for p in paths:
        check_runs_on(p, dev.kind)
    labels = _labels(paths)
    kinds = [artifact_kind(p) for p in paths]
    if baseline is not None and len(set(kinds)) > 1:
        # A ratio of an encoder window to a whole-graph run would mean nothing.
        raise SfcError("the baseline and the artifacts must all be Whisper folders or all not")

    clip_paths = tuple(Path(c) for c in clips) or (default_clips() if "whisper" in kinds else ())
    for c in clip_paths:
        if not c.is_file():
            raise SfcError(f"audio clip not found: {c}")
    if inputs is not None and not Path(inputs).is_file():
        raise SfcError(f"inputs file not found: {inputs}")

    info = dev.describe()
    warnings = [w for w in (_busy_warning(info),) if w]
    for w in warnings:
        logger.info("%s", w)  # the report carries it; the caller decides whether to print

    worker_args = {
        label: WorkerArgs(
            artifact=dev.stage(path), threads=threads, runs=runs, warmup=warmup,
            clips=tuple(dev.stage(c) for c in clip_paths) if kind == "whisper" else (),
            inputs=dev.stage(Path(inputs)) if inputs is not None else None,
            dims=dict(dims or {}), seed=seed, device=dev.kind,
        )
        for label, path, kind in zip(labels, paths, kinds, strict=True)
    }
    measured: dict[str, list[WorkerResult]] = {label: [] for label in labels}
    with progress_bar(enabled=progress, transient=True, console=console) as bar:
        task = bar.add_task("benchmarking", total=rounds * len(labels))
        for r in range(rounds):
            order = labels if r % 2 == 0 else labels[::-1]
            for label in order:
                bar.update(task, description=f"round {r + 1}/{rounds}: {label}")
                try:
                    payload = call_worker(dev, worker_args[label], expect="WorkerResult",
                                          timeout_s=timeout_s)
                except SfcError as exc:
                    raise SfcError(f"benchmark of {label} failed: {exc}") from None
                measured[label].append(WorkerResult.from_data(payload))
                bar.advance(task)

    base_rounds = measured[labels[0]] if baseline is not None else None
    variants = tuple(
        summarize_variant(label, str(path), artifact_size(path), measured[label], base_rounds)
        for label, path in zip(labels, paths, strict=True)
    )
    return BenchReport(
        device=dev.name, device_info=info, threads=threads, runs=runs, warmup=warmup,
        rounds=rounds, clips=tuple(str(c) for c in clip_paths),
        baseline=labels[0] if baseline is not None else None, variants=variants,
        order="alternating",
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        warnings=tuple(warnings),
    )

