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

`WorkerArgs.device` picks the backend (`backends.open_backend`): ORT's CPU or CUDA provider
or TensorRT engines, wall-clock or CUDA-event timing, NVML readings after the timed runs,
tegrastats sampled around the run on a Jetson.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..card import GraphSpec, ModelCard, TensorSpec
from ..errors import SfcError
from ..memory import peak_rss_kib
from .backends import Backend, Timer, check_providers, check_runs_on, engine_graphs, open_backend
from .results import WorkerArgs, WorkerResult, envelope

__all__ = ["MODULE", "describe", "main", "ort_inputs", "random_feed", "run"]

# (start, end, items) of the part telemetry is summarised over, in time.monotonic() seconds.
Window = tuple[float, float, int]

MODULE = "sfc.bench.worker"

# ORT's type strings -> numpy dtypes for random inputs.
_ORT_DTYPES: Mapping[str, type[np.generic]] = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def _warm(fn: Callable[[], object], n: int) -> None:
    for _ in range(n):
        fn()


def _timed(fn: Callable[[], object], runs: int, timer: Timer) -> tuple[float, ...]:
    """Milliseconds of `runs` calls of `fn`, each measured by `timer`."""
    return tuple(timer(fn)[1] for _ in range(runs))


def _ort_sessions(*sessions: Any) -> list[Any]:
    """The ONNX Runtime sessions among `sessions` (TensorRT engine runners are not)."""
    import onnxruntime as ort

    return [s for s in sessions if isinstance(s, ort.InferenceSession)]


def _providers(path: Path, be: Backend) -> tuple[str, ...]:
    """The ORT providers for `path`'s .onnx graphs; an all-engine folder needs none checked."""
    if path.is_dir() and len(engine_graphs(path)) == len(ModelCard.load(path).graphs):
        return be.providers
    return be.onnx_providers()


def _bench_whisper(folder: Path, args: WorkerArgs, be: Backend) -> tuple[WorkerResult, Window]:
    from ..runtime.audio import load_audio
    from ..runtime.decoding import greedy_decode
    from ..runtime.features import whisper_windows
    from ..runtime.whisper import WhisperRuntime

    if not args.clips:
        raise SfcError("a Whisper benchmark needs at least one audio clip")
    providers = _providers(folder, be)
    t0 = time.perf_counter()
    rt = WhisperRuntime.open(folder, threads=args.threads, providers=list(providers))
    load_s = time.perf_counter() - t0
    for session in _ort_sessions(rt.encoder, rt.decoder):
        check_providers(providers, session)
    clips = [load_audio(c, rt.mel.sample_rate) for c in args.clips]

    # One full window of real speech: the clips back to back, repeated until 30 s.
    joined = np.concatenate(clips)
    reps = -(-rt.mel.n_samples // joined.shape[0])
    window = whisper_windows(np.tile(joined, reps)[: rt.mel.n_samples], rt.mel)[:1]
    _warm(lambda: rt.encode(window), args.warmup)
    latency = _timed(lambda: rt.encode(window), args.runs, be.timer)

    # Decoder steps of one real clip; a first untimed decode warms the decoder session.
    cross_k, cross_v = rt.encode(whisper_windows(clips[0], rt.mel)[:1])
    step = rt.step_fn(cross_k, cross_v)
    greedy_decode(step, rt.decoding, 1)
    steps: list[float] = []

    def timed_step(tokens: np.ndarray, past_k: np.ndarray,
                   past_v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out, ms = be.timer(lambda: step(tokens, past_k, past_v))
        steps.append(ms)
        return out

    greedy_decode(timed_step, rt.decoding, 1)

    w0 = time.monotonic()
    for clip in clips:
        rt.transcribe(clip)
    w1 = time.monotonic()
    result = WorkerResult(
        artifact=str(folder), kind="whisper", threads=args.threads, load_s=load_s,
        latency_ms=latency, peak_rss_kib=peak_rss_kib(), decoder_step_ms=tuple(steps),
        audio_s=sum(c.shape[0] for c in clips) / rt.mel.sample_rate, transcribe_s=w1 - w0,
        gpu=be.gpu(),  # sessions still open: their memory is counted
    )
    return result, (w0, w1, len(clips))


def _graph_file(path: Path) -> tuple[Path, GraphSpec | None]:
    """The one graph to time: the file itself, or a generic folder's (only / "model")
    graph with its card entry."""
    if path.is_file():
        return path, None
    card = ModelCard.load(path)
    if "model" in card.graphs or len(card.graphs) == 1:
        spec = card.graphs.get("model") or next(iter(card.graphs.values()))
        return path / spec.path, spec
    raise SfcError(f"{path} holds several graphs ({', '.join(card.graphs)}); "
                   "benchmark one of its .onnx files")


def ort_inputs(metas: Sequence[Any]) -> list[TensorSpec]:
    """ORT input metadata as `TensorSpec`s (unknown dims become "?")."""
    specs = []
    for meta in metas:
        dtype = _ORT_DTYPES.get(meta.type)
        if dtype is None:
            raise SfcError(f"input {meta.name!r} has type {meta.type}; give its values in an .npz")
        specs.append(TensorSpec(meta.name, np.dtype(dtype).name,
                                tuple("?" if d is None else d for d in meta.shape)))
    return specs


def random_feed(inputs: Sequence[TensorSpec], dims: Mapping[str, int],
                seed: int) -> dict[str, np.ndarray]:
    """Random inputs for `inputs` (from ORT metadata or a model card); symbolic dims take
    `dims` or 1."""
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    for spec in inputs:
        dtype = np.dtype(spec.dtype)
        shape = tuple(d if isinstance(d, int) and d >= 0
                      else (dims.get(d, 1) if isinstance(d, str) else 1) for d in spec.shape)
        if np.issubdtype(dtype, np.floating):
            feed[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:
            # Small non-negative values: integer inputs are usually ids, indices or masks.
            feed[spec.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feed


def _npz_feed(path: Path, inputs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise SfcError(f"inputs file not found: {path}")
    with np.load(path) as data:
        missing = [m.name for m in inputs if m.name not in data.files]
        if missing:
            raise SfcError(f"{path} lacks input(s) {', '.join(missing)} "
                           f"(has {', '.join(data.files) or 'nothing'})")
        return {m.name: np.asarray(data[m.name]) for m in inputs}


def _open_graph(path: Path, args: WorkerArgs, be: Backend) -> tuple[Any, Path, list[TensorSpec]]:
    """The session that runs `path`'s graph, the graph file, and its inputs: an ORT session
    on the backend's providers, or the engine runner for a folder's `.plan` (whose inputs
    come from the model card)."""
    graph, spec = _graph_file(path)
    if spec is not None and graph.suffix == ".plan":
        from ..runtime.trt_session import open_engine

        return open_engine(graph), graph, list(spec.inputs)
    from ..runtime.session import open_session

    providers = be.onnx_providers()
    session = open_session(graph, threads=args.threads, providers=list(providers),
                           optimization=spec.optimization if spec is not None else "all")
    check_providers(providers, session)
    return session, graph, ort_inputs(session.get_inputs())


def _bench_generic(path: Path, args: WorkerArgs, be: Backend) -> tuple[WorkerResult, Window]:
    t0 = time.perf_counter()
    session, graph, inputs = _open_graph(path, args, be)
    load_s = time.perf_counter() - t0
    feed = (_npz_feed(Path(args.inputs), inputs) if args.inputs
            else random_feed(inputs, args.dims, args.seed))
    try:
        _warm(lambda: session.run(None, feed), args.warmup)
        w0 = time.monotonic()
        latency = _timed(lambda: session.run(None, feed), args.runs, be.timer)
        w1 = time.monotonic()
    except Exception as exc:  # ORT's shape/type errors: a wrong dims or .npz is a user error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SfcError(f"running {graph} failed: {first}") from None
    result = WorkerResult(artifact=str(path), kind="generic", threads=args.threads,
                          load_s=load_s, latency_ms=latency, peak_rss_kib=peak_rss_kib(),
                          gpu=be.gpu())
    return result, (w0, w1, args.runs)


def describe(kind: str = "cpu", backend: Backend | None = None) -> dict[str, Any]:
    """This machine as a benchmark of `kind` records it: CPU, cores, flags, ORT version,
    providers, timing; the GPU per NVML; the Jetson board, L4T release and power mode.

    Resolving the backend here makes a device without what `kind` needs fail before any
    artifact is copied or run, with a line that names what is missing.
    """
    from ..info import machine_info

    be = backend or open_backend(kind)
    info = machine_info()
    out: dict[str, Any] = {
        "cpu": info.cpu, "cores": info.cores, "cpu_flags": list(info.cpu_flags),
        "onnxruntime": info.packages.get("onnxruntime"),
        "providers": list(info.onnxruntime_providers), "python": info.python,
        "platform": info.platform, "cuda_gpu": info.cuda_gpu,
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "timing": be.timing,
    }
    gpu = be.gpu()
    if gpu is not None:
        out["gpu"] = asdict(gpu)
    if be.kind == "jetson":
        from .jetson import jetson_info

        out["jetson"] = asdict(jetson_info())
    return out


def run(args: WorkerArgs, backend: Backend | None = None) -> dict[str, Any]:
    """Do what `args` asks in this process and return the result envelope; `backend`
    replaces the one `args.device` names (tests give fakes)."""
    if args.mode == "describe":
        return envelope("DeviceInfo", describe(args.device, backend))
    path = Path(args.artifact)
    if not path.exists():
        raise SfcError(f"artifact not found: {path}")
    be = backend or open_backend(args.device)
    check_runs_on(path, be.kind)
    whisper = path.is_dir() and ModelCard.load(path).family == "whisper"
    sampler = be.sampler()
    with sampler if sampler is not None else contextlib.nullcontext():
        result, (start, end, items) = (_bench_whisper if whisper else _bench_generic)(
            path, args, be)
    if sampler is not None:
        result = replace(result, tegrastats=sampler.summary(start, end, items))
    return result.to_dict()


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
