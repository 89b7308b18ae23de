"""The benchmark worker: one process, one artifact, one JSON line on stdout.

Run as ``python -m sfc.bench.worker --json-args '{"artifact": ..., "runs": 20, ...}'``.
Each variant gets a fresh process so that no variant inherits another's caches, thread
pools or allocator state; the same command runs over SSH on an edge device, which is why
the arguments and the result are plain JSON. The last stdout line is always one envelope:
``WorkerResult``, ``DeviceInfo`` (``"mode": "describe"``) or ``WorkerError``.

Whisper folders (card family "whisper"): encoder latency on one 30 s window of real audio,
per-step decoder latency over one greedy decode of a real clip, end-to-end transcription
RTF over the clips, peak RSS. Anything else (an .onnx/.ort file or a generic folder):
latency of the whole graph on inputs from an .npz or random inputs from its input shapes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SfcError
from .results import WorkerArgs, WorkerResult, envelope

__all__ = ["MODULE", "describe", "main", "random_feed", "run"]

MODULE = "sfc.bench.worker"

# ORT's type strings -> numpy dtypes for random inputs.
_ORT_DTYPES: Mapping[str, type[np.generic]] = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def _peak_rss_kib() -> int:
    """This process's peak resident set size in KiB.

    Linux: VmHWM from /proc/self/status, which starts afresh at exec; ru_maxrss does not
    (a worker forked from a large parent reported the parent's peak). Elsewhere ru_maxrss
    (KiB on Linux, bytes on macOS).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak // 1024) if sys.platform == "darwin" else int(peak)


def _timed(fn: Callable[[], object], runs: int, warmup: int) -> tuple[float, ...]:
    """Milliseconds of `runs` calls of `fn` after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000.0)
    return tuple(out)


def _bench_whisper(folder: Path, args: WorkerArgs) -> WorkerResult:
    from ..runtime.audio import load_audio
    from ..runtime.decoding import greedy_decode
    from ..runtime.features import whisper_windows
    from ..runtime.whisper import WhisperRuntime

    if not args.clips:
        raise SfcError("a Whisper benchmark needs at least one audio clip")
    t0 = time.perf_counter()
    rt = WhisperRuntime.open(folder, threads=args.threads)
    load_s = time.perf_counter() - t0
    clips = [load_audio(c, rt.mel.sample_rate) for c in args.clips]

    # One full window of real speech: the clips back to back, repeated until 30 s.
    joined = np.concatenate(clips)
    reps = -(-rt.mel.n_samples // joined.shape[0])
    window = whisper_windows(np.tile(joined, reps)[: rt.mel.n_samples], rt.mel)[:1]
    latency = _timed(lambda: rt.encode(window), args.runs, args.warmup)

    # Decoder steps of one real clip; a first untimed decode warms the decoder session.
    cross_k, cross_v = rt.encode(whisper_windows(clips[0], rt.mel)[:1])
    step = rt.step_fn(cross_k, cross_v)
    greedy_decode(step, rt.decoding, 1)
    steps: list[float] = []

    def timed_step(tokens: np.ndarray, past_k: np.ndarray,
                   past_v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s0 = time.perf_counter()
        out = step(tokens, past_k, past_v)
        steps.append((time.perf_counter() - s0) * 1000.0)
        return out

    greedy_decode(timed_step, rt.decoding, 1)

    t1 = time.perf_counter()
    for clip in clips:
        rt.transcribe(clip)
    transcribe_s = time.perf_counter() - t1
    return WorkerResult(
        artifact=str(folder), kind="whisper", threads=args.threads, load_s=load_s,
        latency_ms=latency, peak_rss_kib=_peak_rss_kib(), decoder_step_ms=tuple(steps),
        audio_s=sum(c.shape[0] for c in clips) / rt.mel.sample_rate, transcribe_s=transcribe_s,
    )


def _graph_file(path: Path) -> tuple[Path, str]:
    """The one graph to time and its ORT optimisation level: the file itself, or a generic
    folder's (only / "model") graph."""
    if path.is_file():
        return path, "all"
    from ..card import ModelCard

    card = ModelCard.load(path)
    if "model" in card.graphs or len(card.graphs) == 1:
        spec = card.graphs.get("model") or next(iter(card.graphs.values()))
        return path / spec.path, spec.optimization
    raise SfcError(f"{path} holds several graphs ({', '.join(card.graphs)}); "
                   "benchmark one of its .onnx files")


def random_feed(inputs: Sequence[Any], dims: Mapping[str, int],
                 seed: int) -> dict[str, np.ndarray]:
    """Random inputs from ORT input metadata; symbolic dims take `dims` or 1."""
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    for meta in inputs:
        dtype = _ORT_DTYPES.get(meta.type)
        if dtype is None:
            raise SfcError(f"input {meta.name!r} has type {meta.type}; give its values in an .npz")
        shape = tuple(d if isinstance(d, int) and d >= 0
                      else (dims.get(d, 1) if isinstance(d, str) else 1) for d in meta.shape)
        if np.issubdtype(dtype, np.floating):
            feed[meta.name] = rng.standard_normal(shape).astype(dtype)
        else:
            # Small non-negative values: integer inputs are usually ids, indices or masks.
            feed[meta.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feed


def _npz_feed(path: Path, inputs: Sequence[Any]) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise SfcError(f"inputs file not found: {path}")
    with np.load(path) as data:
        missing = [m.name for m in inputs if m.name not in data.files]
        if missing:
            raise SfcError(f"{path} lacks input(s) {', '.join(missing)} "
                           f"(has {', '.join(data.files) or 'nothing'})")
        return {m.name: np.asarray(data[m.name]) for m in inputs}


def _bench_generic(path: Path, args: WorkerArgs) -> WorkerResult:
    from ..runtime.session import open_session

    graph, optimization = _graph_file(path)
    t0 = time.perf_counter()
    session = open_session(graph, threads=args.threads, optimization=optimization)
    load_s = time.perf_counter() - t0
    metas = session.get_inputs()
    feed = (_npz_feed(Path(args.inputs), metas) if args.inputs
            else random_feed(metas, args.dims, args.seed))
    try:
        latency = _timed(lambda: session.run(None, feed), args.runs, args.warmup)
    except Exception as exc:  # ORT's shape/type errors: a wrong dims or .npz is a user error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SfcError(f"running {graph} failed: {first}") from None
    return WorkerResult(artifact=str(path), kind="generic", threads=args.threads,
                        load_s=load_s, latency_ms=latency, peak_rss_kib=_peak_rss_kib())


def describe() -> dict[str, Any]:
    """This machine as a benchmark records it: CPU, cores, flags, ORT version, providers."""
    from ..info import machine_info

    info = machine_info()
    return {
        "cpu": info.cpu, "cores": info.cores, "cpu_flags": list(info.cpu_flags),
        "onnxruntime": info.packages.get("onnxruntime"),
        "providers": list(info.onnxruntime_providers), "python": info.python,
        "platform": info.platform, "cuda_gpu": info.cuda_gpu,
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def run(args: WorkerArgs) -> dict[str, Any]:
    """Do what `args` asks in this process and return the result envelope."""
    if args.mode == "describe":
        return envelope("DeviceInfo", describe())
    path = Path(args.artifact)
    if not path.exists():
        raise SfcError(f"artifact not found: {path}")
    if path.is_dir():
        from ..card import ModelCard

        if ModelCard.load(path).family == "whisper":
            return _bench_whisper(path, args).to_dict()
    return _bench_generic(path, args).to_dict()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: print one JSON line; exit 0 on success, 2 on a user error."""
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__)
    parser.add_argument("--json-args", required=True, help="WorkerArgs as JSON")
    ns = parser.parse_args(argv)
    real_stdout = sys.stdout
    code = 0
    try:
        # Library chatter goes to stderr so that stdout carries only the result line.
        with contextlib.redirect_stdout(sys.stderr):
            out = run(WorkerArgs.from_json(ns.json_args))
    except SfcError as exc:
        out, code = envelope("WorkerError", {"message": str(exc)}), 2
    real_stdout.write(json.dumps(out, separators=(",", ":")) + "\n")
    real_stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
