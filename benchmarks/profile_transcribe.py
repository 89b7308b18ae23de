"""Where one transcription's time goes, by part and by ONNX op type, against this CPU's limit.

Run from the repository root::

    python benchmarks/profile_transcribe.py                                # FP32 tiny.en
    python benchmarks/profile_transcribe.py --model fp32=whisper-tiny.en --model w8a8=build

Each ``--model`` (an sfc export or build folder, or a zoo name; ``label=path`` names it) is
profiled in its own fresh subprocess (this script re-invoked with the hidden ``--worker``
flag), so no model inherits another's threads or allocator:

1. Timing pass. ``WhisperRuntime.open(folder, threads=...)`` transcribes the first
   ``--limit`` clips of the manifest after one untimed warm-up transcription, with timers
   wrapped around its pieces from outside: the runtime's ``whisper_windows`` (feature
   extraction, log-mel), the encoder session's ``run`` and the decoder session's ``run``
   (the decoder steps of ``step_fn``). Python overhead is the rest of ``transcribe``:
   the greedy loop, token suppression, argmax, the loop guard and the tokenizer.
2. Profile pass (separate: profiling slows every node). Fresh sessions with ONNX
   Runtime's profiler on, same optimisation level and threads, transcribe the first
   ``--profile-clips`` clips after a warm-up; kernel time is summed per op type and graph
   from the trace's events (``cat == "Node"``, ``args.op_name``). ORT also saves the graph
   it optimised, so every profiled node's attributes and weights are known.
3. GEMM work. FLOPs of the GEMM-like nodes (`GEMM_OPS`) of one encoder run and of one
   decoder step of one token whose cache length is the profiled step closest to the timing
   pass's median, from those nodes' attributes and the shapes the profiler recorded.

One more subprocess then times ONNX Runtime's own FP32 GEMM (``MatMul``) and INT8 GEMM
(``MatMulIntegerToFloat``, u8 activations x s8 weights with per-channel scales: what the
ort-cpu target's W8A8 graphs run after ORT's QDQ fusion) at every distinct shape found, as
single-op models (several copies of the node side by side when one is too short to time,
each with its own weights, like the layers of a model), taking the best run.

The limit is the time the GEMMs alone would take at those rates: the sum over GEMM-like
nodes of FLOPs / the rate at that shape, every other op (softmax, layer norm, quantize,
transposes, ...) counted at zero cost, so a GEMM-only lower bound. It is given four ways:
as run (each GEMM at the rate of the precision the graph runs it in), best (each at the
faster of the two), all INT8 and all FP32. Each copy in a microbenchmark has its own
weights, so a decoder step's small products read their weights from memory or cache as a
model's layers do, not from the L1 of one repeated node. Fraction of the limit = limit /
measured time, the measured time being the timing pass's median encoder run per 30 s
window and median one-token decoder step (``session.run`` wall time).

The JSON report (default ``benchmarks/results/profile_transcribe.json``) holds the machine
description, the command, every timing and the summaries.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shlex
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import onnx
from common import machine_info, machine_line, print_table, run_marked_worker
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "calibration_data" / "eval"
DEFAULT_JSON = REPO / "benchmarks" / "results" / "profile_transcribe.json"
DEFAULT_MODEL = "whisper-tiny.en"

# Workers print exactly one line starting with this marker; libraries may print others.
RESULT_MARKER = "PROFILE_RESULT "
KERNEL_SUFFIX = "_kernel_time"  # ORT names a node's kernel event "<node name>_kernel_time"

FP32, INT8 = "fp32", "int8"
BEST = "best"  # each GEMM at the faster of the two precisions' rates at its shape
FLOAT_GEMMS = frozenset({"MatMul", "Gemm", "FusedMatMul", "FusedGemm", "Conv", "FusedConv"})
INT8_GEMMS = frozenset({"MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul",
                        "DynamicQuantizeMatMul", "ConvInteger", "QLinearConv"})
# ORT's fused attention (sfc's ort-cpu rewrite makes it): its two products, QK^T and AV,
# count as FP32 GEMMs; its kernel time, softmax included, is split evenly between them.
ATTENTION_OPS = frozenset({"MultiHeadAttention"})
GEMM_OPS = FLOAT_GEMMS | INT8_GEMMS | ATTENTION_OPS | {"MatMulNBits"}
CONV_OPS = frozenset({"Conv", "FusedConv", "ConvInteger", "QLinearConv"})
WEIGHT_INPUT = {"QLinearMatMul": 3, "QLinearConv": 3}  # else input 1

# A microbenchmark run should hold about this much GEMM work, so that ORT's per-run cost
# (tens of microseconds) does not count as GEMM time for a decoder step's small products.
TARGET_FLOPS = 2e7
MAX_COPIES = 64


# ----------------------------------------------------------------------------- pure parts


@dataclass(frozen=True)
class GemmShape:
    """`batch` independent products of [m, k] by [k, n]; `weight`: the [k, n] operand is a
    constant (prepacked by ORT), else an activation (attention)."""

    batch: int
    m: int
    k: int
    n: int
    weight: bool

    @property
    def flops(self) -> int:
        """Multiply-adds counted as two operations."""
        return 2 * self.batch * self.m * self.k * self.n


@dataclass(frozen=True)
class Gemm:
    """One GEMM-like node of one profiled run: its shape, the precision it runs in, and its
    profiled kernel time."""

    node: str
    op_type: str
    kind: str  # FP32 or INT8
    shape: GemmShape
    us: float

    @property
    def flops(self) -> int:
        """FLOPs of the node."""
        return self.shape.flops


def parse_model_arg(text: str) -> tuple[str, str]:
    """``label=path_or_name`` or a bare path/name (labelled by its last path component)."""
    label, sep, spec = text.partition("=")
    if not sep:
        spec = text
        label = Path(text.rstrip("/")).name or text
    if not label or not spec:
        raise ValueError(f"--model {text!r}: expected LABEL=FOLDER_OR_NAME or FOLDER_OR_NAME")
    return label, spec


def _first_shape(entries: Sequence[Mapping[str, Sequence[int]]]) -> list[int]:
    """The shape of the first tensor in a profiler ``input/output_type_shape`` list."""
    (shape,) = entries[0].values()
    return [int(d) for d in shape]


def split_runs(events: Iterable[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """The kernel events of an ORT profile, one list per ``model_run``, in run order."""
    events = list(events)
    runs = sorted((e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"),
                  key=lambda e: e["ts"])
    starts = [r["ts"] for r in runs]
    out: list[list[Mapping[str, Any]]] = [[] for _ in runs]
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith(KERNEL_SUFFIX):
            continue
        i = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if i < 0 or e["ts"] > runs[i]["ts"] + runs[i]["dur"]:
            raise ValueError(f"profile event {e['name']} lies outside every model_run")
        out[i].append(e)
    return out


def op_type_us(events: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Kernel microseconds per op type, largest first."""
    totals: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith(KERNEL_SUFFIX):
            totals[e["args"]["op_name"]] += float(e["dur"])
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def gemm_shape(node: onnx.NodeProto, a: Sequence[int], y: Sequence[int],
               initializers: Mapping[str, Sequence[int]],
               w: Sequence[int] | None = None) -> GemmShape:
    """The GEMM a GEMM-like node computes, from its first input's and output's shapes.

    Convolutions count as their im2col GEMM (m = output positions, k = input channels per
    group x kernel, n = output channels per group, one product per group); `w` is the
    weight's shape where it is not an initializer (only read when the node carries no
    ``kernel_shape``).
    """
    attrs = _attrs(node)
    if node.op_type in CONV_OPS:
        weight = node.input[WEIGHT_INPUT.get(node.op_type, 1)]
        kernel = attrs.get("kernel_shape") or list((initializers.get(weight) or w or [])[2:])
        if not kernel:
            raise ValueError(f"{node.name}: no kernel_shape and no known weight shape")
        group = int(attrs.get("group", 1))
        return GemmShape(batch=group, m=y[0] * math.prod(y[2:]),
                         k=a[1] // group * math.prod(kernel), n=y[1] // group, weight=True)
    if node.op_type == "MatMulNBits":
        k, weight = int(attrs["K"]), True
    else:
        k = a[-2] if attrs.get("transA", 0) and len(a) >= 2 else a[-1]
        weight = node.input[WEIGHT_INPUT.get(node.op_type, 1)] in initializers
    n = y[-1]
    if weight:  # one product over all rows: the constant operand is shared
        return GemmShape(batch=1, m=math.prod(y[:-1]), k=k, n=n, weight=True)
    m = y[-2] if len(y) >= 2 else 1
    return GemmShape(batch=math.prod(y[:-2]), m=m, k=k, n=n, weight=False)


def gemm_kind(node: onnx.NodeProto) -> str:
    """The precision a GEMM-like node multiplies in: MatMulNBits computes in INT8 at
    ``accuracy_level`` 4 and dequantizes to FP32 otherwise (MLAS's paths)."""
    if node.op_type == "MatMulNBits":
        return INT8 if _attrs(node).get("accuracy_level", 0) == 4 else FP32
    return INT8 if node.op_type in INT8_GEMMS else FP32


def gemms_of_run(graph: onnx.GraphProto,
                 run: Iterable[Mapping[str, Any]]) -> list[Gemm]:
    """The GEMM-like nodes among one run's kernel events; `graph` is the graph ORT ran
    (its saved optimised graph: profile event names are its node names)."""
    nodes = {n.name: n for n in graph.node}
    initializers = {i.name: list(i.dims) for i in graph.initializer}
    out = []
    for e in run:
        args = e["args"]
        if args["op_name"] not in GEMM_OPS:
            continue
        name = e["name"][: -len(KERNEL_SUFFIX)]
        if name not in nodes:  # ORT calls an unnamed node "<op>_<its index>" in the trace
            raise ValueError(f"profiled node {name} is not in the saved graph; the profile "
                             "needs named GEMM nodes")
        node = nodes[name]
        if node.op_type in ATTENTION_OPS:
            out.extend(attention_gemms(node, args, float(e["dur"])))
            continue
        # ORT leaves out the inputs it prepacked (constant weights): the first input (never
        # a weight here) and the output are read from the event, the weight only when
        # every input is listed.
        inputs = args["input_type_shape"]
        a = initializers.get(node.input[0]) or _first_shape(inputs)
        w_index = WEIGHT_INPUT.get(node.op_type, 1)
        complete = len(inputs) == sum(1 for i in node.input if i) > w_index
        w = _first_shape(inputs[w_index:]) if complete else None
        shape = gemm_shape(node, a, _first_shape(args["output_type_shape"]), initializers, w)
        out.append(Gemm(name, node.op_type, gemm_kind(node), shape, float(e["dur"])))
    return out


def attention_gemms(node: onnx.NodeProto, args: Mapping[str, Any], us: float) -> list[Gemm]:
    """QK^T and AV of a MultiHeadAttention event whose query and key are [B, T, H*d]."""
    inputs = args["input_type_shape"]
    (q,), (k,) = inputs[0].values(), inputs[1].values()
    heads = int(_attrs(node)["num_heads"])
    b, t, width = (int(d) for d in q)
    keys, d = int(k[1]), int(q[2]) // heads
    if len(k) != 3 or width % heads:
        raise ValueError(f"{node.name}: attention shapes {q} x {k} are not [B, T, H*d]")
    return [Gemm(f"{node.name}/QK", node.op_type, FP32,
                 GemmShape(batch=b * heads, m=t, k=d, n=keys, weight=False), us / 2),
            Gemm(f"{node.name}/AV", node.op_type, FP32,
                 GemmShape(batch=b * heads, m=t, k=keys, n=d, weight=False), us / 2)]


RateKey = tuple[str, GemmShape]


def limit_seconds(gemms: Iterable[Gemm], rates: Mapping[RateKey, float],
                  kind: str | None = None) -> float:
    """Sum of FLOPs / rate (FLOP/s) over `gemms`: each at the rate of its own precision at
    its shape (`kind` None), of `kind` (FP32 or INT8), or of the faster of both (BEST)."""
    def rate(g: Gemm) -> float:
        if kind == BEST:
            return max(rates[(FP32, g.shape)], rates[(INT8, g.shape)])
        return rates[(kind or g.kind, g.shape)]

    return sum(g.flops / rate(g) for g in gemms)


def fraction_of_limit(limit_s: float, measured_s: float) -> float:
    """How close a measured time comes to its limit (1.0 = at the limit)."""
    return limit_s / measured_s


def copies_for(shape: GemmShape) -> int:
    """Copies of a node a microbenchmark runs side by side, for ~`TARGET_FLOPS` per run."""
    return max(1, min(MAX_COPIES, math.ceil(TARGET_FLOPS / shape.flops)))


# s8 B values: exact on every CPU class. Without VNNI (AVX2) ONNX Runtime sums pairs of
# u8 x s8 products in int16, which saturates past 2**15 - 1; 255 * 64 * 2 stays below.
# The GEMM rates do not depend on the values.
B_RANGE = (-64, 64)


def gemm_model(kind: str, shape: GemmShape, copies: int,
               rng: np.random.Generator) -> onnx.ModelProto:
    """`copies` independent GEMM nodes of `shape` reading one input A (and one B when B is
    an activation); constant weights are random, one per copy, as in a model's layers.

    FP32: ``MatMul``. INT8: ``MatMulIntegerToFloat`` with u8 A (zero point 128, what ORT
    makes of sfc's symmetric int8 activations), s8 B without zero point, per-channel B
    scales for a weight, per-tensor for an activation.
    """
    a_dims = [shape.m, shape.k] if shape.weight else [shape.batch, shape.m, shape.k]
    b_dims = [shape.k, shape.n] if shape.weight else [shape.batch, shape.k, shape.n]
    is_int8 = kind == INT8
    a_type = TensorProto.UINT8 if is_int8 else TensorProto.FLOAT
    b_type = TensorProto.INT8 if is_int8 else TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("A", a_type, a_dims)]
    if not shape.weight:
        inputs.append(helper.make_tensor_value_info("B", b_type, b_dims))
    inits: list[TensorProto] = []
    if is_int8:
        n_scales = [shape.n] if shape.weight else []
        inits += [numpy_helper.from_array(np.array(0.02, np.float32), "a_scale"),
                  numpy_helper.from_array(np.full(n_scales, 0.001, np.float32), "b_scale"),
                  numpy_helper.from_array(np.array(128, np.uint8), "a_zero")]
    nodes, outputs = [], []
    for i in range(copies):
        b = "B"
        if shape.weight:
            b = f"W{i}"
            values = (rng.integers(*B_RANGE, b_dims, dtype=np.int8) if is_int8
                      else rng.standard_normal(b_dims, dtype=np.float32))
            inits.append(numpy_helper.from_array(values, b))
        if is_int8:
            nodes.append(helper.make_node("MatMulIntegerToFloat",
                                          ["A", b, "a_scale", "b_scale", "a_zero"], [f"Y{i}"],
                                          name=f"gemm{i}", domain="com.microsoft"))
        else:
            nodes.append(helper.make_node("MatMul", ["A", b], [f"Y{i}"], name=f"gemm{i}"))
        outputs.append(helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, f"{kind}_gemm", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)])


def gemm_inputs(kind: str, shape: GemmShape, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random feeds for `gemm_model`."""
    feeds: dict[str, np.ndarray]
    if kind == INT8:
        feeds = {"A": rng.integers(0, 256, [shape.batch, shape.m, shape.k], dtype=np.uint8)}
        if not shape.weight:
            feeds["B"] = rng.integers(*B_RANGE, [shape.batch, shape.k, shape.n], dtype=np.int8)
    else:
        feeds = {"A": rng.standard_normal([shape.batch, shape.m, shape.k], dtype=np.float32)}
        if not shape.weight:
            feeds["B"] = rng.standard_normal([shape.batch, shape.k, shape.n], dtype=np.float32)
    if shape.weight:
        feeds["A"] = feeds["A"][0]
    return feeds


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


# ----------------------------------------------------------------------------- worker: profile


class TimedRuns:
    """A session stand-in that times each ``run`` and keeps its seconds and feed shapes."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.calls: list[tuple[float, dict[str, tuple[int, ...]]]] = []

    def run(self, output_names: Any, feeds: Mapping[str, np.ndarray]) -> Any:
        """The session's ``run``, timed."""
        start = time.perf_counter()
        out = self.session.run(output_names, feeds)
        seconds = time.perf_counter() - start
        self.calls.append((seconds, {k: tuple(v.shape) for k, v in feeds.items()}))
        return out


@contextlib.contextmanager
def timed_features(log: list[float]) -> Iterator[None]:
    """Time the runtime's feature extraction (its module's ``whisper_windows``)."""
    import sfc.runtime.whisper as whisper_runtime

    original = whisper_runtime.whisper_windows

    def timed(audio: np.ndarray, spec: Any) -> np.ndarray:
        start = time.perf_counter()
        out = original(audio, spec)
        log.append(time.perf_counter() - start)
        return out

    with mock.patch.object(whisper_runtime, "whisper_windows", timed):
        yield


def _step(call: tuple[float, dict[str, tuple[int, ...]]]) -> dict[str, Any]:
    seconds, shapes = call
    batch, tokens = shapes["tokens"]
    return {"s": seconds, "batch": batch, "tokens": tokens, "past": shapes["past_key"][3]}


def timing_pass(rt: Any, audios: Sequence[np.ndarray], ids: Sequence[str]) -> dict[str, Any]:
    """Transcribe `audios` after a warm-up with every part timed (see the module doc)."""
    encoder, decoder = TimedRuns(rt.encoder), TimedRuns(rt.decoder)
    timed_rt = replace(rt, encoder=encoder, decoder=decoder)
    features: list[float] = []
    clips = []
    with timed_features(features):
        timed_rt.transcribe(audios[0])
        encoder.calls.clear()
        decoder.calls.clear()
        features.clear()
        for uid, audio in zip(ids, audios, strict=True):
            marks = len(features), len(encoder.calls), len(decoder.calls)
            start = time.perf_counter()
            text = timed_rt.transcribe(audio).text
            total = time.perf_counter() - start
            part = {
                "features_s": sum(features[marks[0]:]),
                "encoder_s": sum(s for s, _ in encoder.calls[marks[1]:]),
                "decoder_s": sum(s for s, _ in decoder.calls[marks[2]:]),
            }
            clips.append({"id": uid, "audio_s": len(audio) / rt.mel.sample_rate,
                          "total_s": total, **part,
                          "python_s": total - sum(part.values()),
                          "steps": len(decoder.calls) - marks[2], "text": text})
    return {"clips": clips,
            "encoder_runs": [{"s": s, "batch": shapes["input_features"][0]}
                             for s, shapes in encoder.calls],
            "decoder_steps": [_step(c) for c in decoder.calls]}


def profiling_session(folder: Path, graph: Any, threads: int, work: Path, name: str) -> Any:
    """An ORT session with the runtime's options (`session_options`: the graph's
    optimisation level, threads) and the profiler on, its optimised graph saved."""
    import onnxruntime as ort

    from sfc.errors import SfcError
    from sfc.runtime.session import session_options

    if not graph.path.endswith(".onnx"):
        raise SfcError(f"{folder / graph.path}: the profile needs ONNX Runtime graphs")
    options = session_options(threads=threads, optimization=graph.optimization)
    options.enable_profiling = True
    options.profile_file_prefix = str(work / name)
    options.optimized_model_filepath = str(work / f"{name}.onnx")
    # Weights go to a side file, so the graph reads back without them.
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_file_name", f"{name}.data")
    options.log_severity_level = 3  # ORT warns that an ENABLE_ALL graph is CPU-specific
    return ort.InferenceSession(str(folder / graph.path), options,
                                providers=["CPUExecutionProvider"])


def _graph_profile(session: Any, timed: TimedRuns, warm: int, work: Path,
                   name: str) -> tuple[onnx.GraphProto, list[list[Mapping[str, Any]]],
                                    dict[str, Any]]:
    """Optimised graph, kernel events per profiled run, and op-type totals of one graph."""
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = split_runs(events)
    if len(runs) != len(timed.calls):
        raise RuntimeError(f"{name}: {len(runs)} profiled runs for {len(timed.calls)} calls")
    graph = onnx.load(str(work / f"{name}.onnx"), load_external_data=False).graph
    profiled = runs[warm:]
    totals = op_type_us(e for run in profiled for e in run)
    return graph, profiled, {"runs": len(profiled), "op_type_us": totals}


def profile_pass(rt: Any, folder: Path, audios: Sequence[np.ndarray], threads: int,
                 median_past: float | None) -> dict[str, Any]:
    """Op-type split of both graphs and the GEMMs of one encoder run and one decoder step."""
    with tempfile.TemporaryDirectory(prefix="sfc-profile-") as tmp:
        work = Path(tmp)
        sessions = {key: profiling_session(folder, rt.card.graphs[key], threads, work, key)
                    for key in ("encoder", "decoder")}
        encoder, decoder = TimedRuns(sessions["encoder"]), TimedRuns(sessions["decoder"])
        profiled_rt = replace(rt, encoder=encoder, decoder=decoder)
        profiled_rt.transcribe(audios[0])  # warm-up: its runs are left out below
        warm_enc, warm_dec = len(encoder.calls), len(decoder.calls)
        for audio in audios:
            profiled_rt.transcribe(audio)
        enc_graph, enc_runs, enc_ops = _graph_profile(sessions["encoder"], encoder, warm_enc,
                                                      work, "encoder")
        dec_graph, dec_runs, dec_ops = _graph_profile(sessions["decoder"], decoder, warm_dec,
                                                      work, "decoder")
    enc_call = encoder.calls[warm_enc]
    result: dict[str, Any] = {
        "clips": len(audios), "encoder": enc_ops, "decoder": dec_ops,
        "encoder_run": {"batch": enc_call[1]["input_features"][0],
                        "gemms": [asdict(g) for g in gemms_of_run(enc_graph, enc_runs[0])]},
        "decoder_step": None,
    }
    steps = [(i, _step(c)) for i, c in enumerate(decoder.calls[warm_dec:])]
    one_token = [(i, s) for i, s in steps if s["tokens"] == 1]
    if one_token and median_past is not None:
        i, step = min(one_token, key=lambda s: abs(s[1]["past"] - median_past))
        result["decoder_step"] = {**step, "gemms": [asdict(g) for g in
                                                    gemms_of_run(dec_graph, dec_runs[i])]}
    return result


def run_profile_worker(folder: Path, data: Path, limit: int, profile_clips: int,
                       threads: int) -> dict[str, Any]:
    """Timing pass then profile pass of one model folder."""
    from sfc.runtime.audio import load_audio
    from sfc.runtime.whisper import WhisperRuntime

    utterances = _select(data, limit)
    audios = [load_audio(u.audio) for u in utterances]
    rt = WhisperRuntime.open(folder, threads=threads)
    timing = timing_pass(rt, audios, [u.id for u in utterances])
    pasts = [s["past"] for s in timing["decoder_steps"] if s["tokens"] == 1]
    median_past = _median(pasts)
    rt = replace(rt, encoder=None, decoder=None)  # release the timing pass's sessions
    profile = profile_pass(rt, folder, audios[:profile_clips], threads, median_past)
    return {"folder": str(folder), "timing": timing, "median_past": median_past,
            "profile": profile}


# ----------------------------------------------------------------------------- worker: GEMMs


def time_gemm(kind: str, shape: GemmShape, threads: int, seconds: float) -> dict[str, Any]:
    """Best and median time of one run of `gemm_model` (outputs bound once, no copies)."""
    import onnxruntime as ort

    from sfc.runtime.session import session_options

    rng = np.random.default_rng(0)
    copies = copies_for(shape)
    session = ort.InferenceSession(gemm_model(kind, shape, copies, rng).SerializeToString(),
                                   session_options(threads=threads),
                                   providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    feeds = gemm_inputs(kind, shape, rng)
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    out_shape = [shape.m, shape.n] if shape.weight else [shape.batch, shape.m, shape.n]
    outputs = [np.empty(out_shape, np.float32) for _ in range(copies)]
    for i, out in enumerate(outputs):
        binding.bind_output(f"Y{i}", "cpu", 0, np.float32, out_shape, out.ctypes.data)
    for _ in range(3):
        session.run_with_iobinding(binding)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        session.run_with_iobinding(binding)
        times.append(time.perf_counter() - t0)
    work = shape.flops * copies
    return {"kind": kind, "shape": asdict(shape), "copies": copies, "runs": len(times),
            "best_s": min(times), "median_s": statistics.median(times),
            "rate": work / min(times), "rate_median": work / statistics.median(times)}


def run_gemm_worker(shapes_file: Path, threads: int, seconds: float) -> list[dict[str, Any]]:
    """Rates of both precisions at every shape listed in `shapes_file`."""
    shapes = [GemmShape(**s) for s in json.loads(shapes_file.read_text())]
    return [time_gemm(kind, s, threads, seconds) for s in shapes for kind in (FP32, INT8)]


# ----------------------------------------------------------------------------- parent side


def _select(data: Path, limit: int) -> list[Any]:
    from sfc.eval.manifest import read_manifest

    utterances = read_manifest(data)
    return utterances[:limit] if limit > 0 else utterances


def spawn(args: Sequence[str], what: str) -> Any:
    """Run this script as a worker in a fresh interpreter and return its parsed result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    return run_marked_worker(cmd, what, RESULT_MARKER)


def _gemms(entries: Iterable[Mapping[str, Any]]) -> list[Gemm]:
    return [Gemm(**{**e, "shape": GemmShape(**e["shape"])}) for e in entries]


PARTS = ("features", "encoder", "decoder", "python")
PART_NAMES = {"features": "features (log-mel)", "encoder": "encoder",
              "decoder": "decoder steps", "python": "Python overhead"}


def time_split(timing: Mapping[str, Any]) -> dict[str, Any]:
    """Totals, shares and per-clip medians of the timing pass's parts."""
    clips = timing["clips"]
    total = sum(c["total_s"] for c in clips)
    parts = {p: {"total_s": sum(c[f"{p}_s"] for c in clips),
                 "median_clip_s": statistics.median(c[f"{p}_s"] for c in clips)}
             for p in PARTS}
    for part in parts.values():
        part["share"] = part["total_s"] / total
    steps = timing["decoder_steps"]
    one_token = [s["s"] for s in steps if s["tokens"] == 1]
    return {
        "clips": len(clips), "audio_s": sum(c["audio_s"] for c in clips), "total_s": total,
        "median_clip_s": statistics.median(c["total_s"] for c in clips), "parts": parts,
        "decoder_steps": len(steps),
        "ms_per_step": 1e3 * parts["decoder"]["total_s"] / len(steps) if steps else None,
        "median_one_token_step_s": _median(one_token),
        "median_encoder_window_s": _median([r["s"] / r["batch"]
                                            for r in timing["encoder_runs"]]),
    }


def limits(gemms: Sequence[Gemm], rates: Mapping[RateKey, float], measured_s: float | None,
           per: int = 1) -> dict[str, Any]:
    """FLOPs, profiled GEMM time and the limits of one run (as run, best, all INT8, all
    FP32), divided by `per` (windows in an encoder batch), with fractions of `measured_s`."""
    out: dict[str, Any] = {"flops": sum(g.flops for g in gemms) / per,
                           "gemm_kernel_s": sum(g.us for g in gemms) / 1e6 / per,
                           "measured_s": measured_s}
    for name, kind in (("as_run", None), (BEST, BEST), (INT8, INT8), (FP32, FP32)):
        limit = limit_seconds(gemms, rates, kind) / per
        out[f"limit_{name}_s"] = limit
        out[f"fraction_{name}"] = fraction_of_limit(limit, measured_s) if measured_s else None
    return out


def summarize(result: Mapping[str, Any], rates: Mapping[RateKey, float]) -> dict[str, Any]:
    """Time split, op-type split and limits of one model's worker result."""
    split = time_split(result["timing"])
    profile = result["profile"]
    enc = profile["encoder_run"]
    summary: dict[str, Any] = {
        "time_split": split,
        "encoder_window": limits(_gemms(enc["gemms"]), rates,
                                 split["median_encoder_window_s"], enc["batch"]),
        "decoder_step": None,
    }
    step = profile["decoder_step"]
    if step is not None:
        summary["decoder_step"] = {
            "past": step["past"], "batch": step["batch"],
            **limits(_gemms(step["gemms"]), rates, split["median_one_token_step_s"])}
    return summary


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def _pct(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction * 100:.1f}%"


def show(report: Mapping[str, Any], top: int) -> None:
    """The four tables of a report."""
    models = report["models"]
    rows = []
    for label, m in models.items():
        split = m["summary"]["time_split"]
        for p in PARTS:
            part = split["parts"][p]
            rows.append([label, PART_NAMES[p], f"{part['total_s']:.2f}",
                         _pct(part["share"]), _ms(part["median_clip_s"])])
        rows.append([label, "total", f"{split['total_s']:.2f}", "100.0%",
                     _ms(split["median_clip_s"])])
    notes = [f"{label}: {m['summary']['time_split']['decoder_steps']} decoder steps, "
             f"{m['summary']['time_split']['ms_per_step']:.2f} ms per step "
             f"(median one-token step {_ms(m['summary']['time_split']['median_one_token_step_s'])}"
             f" ms), audio {m['summary']['time_split']['audio_s']:.1f} s"
             for label, m in models.items()]
    print_table(f"Time split of a transcription, {report['n_files']} clips, "
                f"{report['threads']} threads (timing pass)",
                ["model", "part", "total s", "share", "median per clip ms"], rows,
                "\n".join(notes), width=110)

    rows = []
    for label, m in models.items():
        prof = m["profile"]
        for graph, per in (("encoder", "run"), ("decoder", "step")):
            ops, runs = prof[graph]["op_type_us"], prof[graph]["runs"]
            total = sum(ops.values())
            shown = list(ops.items())[:top]
            rest = total - sum(us for _, us in shown)
            if rest > 0:
                shown.append((f"other ({len(ops) - top})", rest))
            for op, us in shown:
                rows.append([label, f"{graph} per {per}", op, f"{us / runs / 1e3:.3f}",
                             _pct(us / total)])
    print_table(f"Kernel time by op type (ONNX Runtime profiler, {report['profile_clips']} "
                "clips after a warm-up)", ["model", "graph", "op type", "ms", "share"], rows,
                "ms = summed kernel time / runs; share of the graph's summed kernel time.",
                width=110)

    rows = []
    for label, m in models.items():
        s = m["summary"]
        parts = [("encoder, 30 s window", s["encoder_window"], 1e9, "GFLOP")]
        if s["decoder_step"] is not None:
            parts.append((f"decoder step, cache {s['decoder_step']['past']}",
                          s["decoder_step"], 1e6, "MFLOP"))
        for name, lim, scale, unit in parts:
            rows.append([label, name, f"{lim['flops'] / scale:.2f} {unit}",
                         _ms(lim["measured_s"]), _ms(lim["gemm_kernel_s"]),
                         _ms(lim["limit_as_run_s"]), _pct(lim["fraction_as_run"]),
                         _ms(lim["limit_best_s"]), _pct(lim["fraction_best"])])
    print_table("GEMM work against this CPU's limit (ORT's own GEMMs at these shapes)",
                ["model", "work", "GEMM FLOPs", "measured ms", "GEMM kernels ms",
                 "limit as run ms", "of limit", "limit best ms", "of limit"], rows,
                "limit = sum over GEMM-like nodes of FLOPs / ORT's GEMM rate at that shape "
                "(best run): a lower bound counting GEMMs only,\nevery other op at zero cost. "
                "as run: each GEMM at its graph's precision; best: at the faster of INT8 and "
                "FP32 (all-INT8 and all-FP32\nlimits are in the JSON). measured = median "
                "session.run time (timing pass); GEMM kernels = the profiled run's GEMM kernel "
                "time;\nof limit = limit / measured.", width=130)

    rows = [[f"{s['batch']}x{s['m']}x{s['k']}x{s['n']}", "weight" if s["weight"] else "act",
             f"{rates[FP32]['rate'] / 1e9:.1f}", f"{rates[INT8]['rate'] / 1e9:.1f}",
             str(rates[FP32]["copies"])]
            for s, rates in _rate_rows(report["gemm_rates"])]
    print_table("ORT GEMM rates at the profiled shapes",
                ["batch x M x K x N", "B", "FP32 GFLOP/s", "INT8 GOP/s", "copies"], rows,
                "FP32: MatMul; INT8: MatMulIntegerToFloat u8 x s8; best run; copies = nodes "
                "side by side per run.", width=100)


def _rate_rows(entries: Sequence[Mapping[str, Any]]) -> list[tuple[dict, dict[str, Any]]]:
    by_shape: dict[str, dict[str, Any]] = {}
    shapes: dict[str, dict] = {}
    for e in entries:
        key = json.dumps(e["shape"], sort_keys=True)
        shapes[key] = e["shape"]
        by_shape.setdefault(key, {})[e["kind"]] = e
    return [(shapes[k], by_shape[k]) for k in sorted(
        by_shape, key=lambda k: -GemmShape(**shapes[k]).flops)]


def run_parent(args: argparse.Namespace) -> int:
    from sfc.atomic import write_json_atomic
    from sfc.models import model_folder

    command = shlex.join(["python", *sys.argv])
    machine = machine_info(args.threads)
    line = machine_line(machine)
    print(line)
    print(f"command: {command}", flush=True)
    folders = {label: model_folder(spec) for label, spec in args.model}  # export once here
    n_files = len(_select(args.data, args.limit))

    models: dict[str, dict[str, Any]] = {}
    common = ["--data", str(args.data), "--limit", str(args.limit), "--threads",
              str(args.threads), "--profile-clips", str(args.profile_clips)]
    for label, folder in folders.items():
        t0 = time.perf_counter()
        models[label] = spawn(["--worker", "profile", "--folder", str(folder), *common], label)
        print(f"  {label}: {folder} profiled in {time.perf_counter() - t0:.0f} s", flush=True)

    shapes = sorted({g.shape for m in models.values()
                     for g in _gemms(m["profile"]["encoder_run"]["gemms"]
                                     + (m["profile"]["decoder_step"] or {}).get("gemms", []))},
                    key=lambda s: -s.flops)
    with tempfile.TemporaryDirectory(prefix="sfc-gemm-") as tmp:
        shapes_file = Path(tmp) / "shapes.json"
        shapes_file.write_text(json.dumps([asdict(s) for s in shapes]))
        t0 = time.perf_counter()
        gemm_rates = spawn(["--worker", "gemm", "--shapes", str(shapes_file), "--threads",
                            str(args.threads), "--gemm-seconds", str(args.gemm_seconds)],
                           "gemm")
    print(f"  {len(shapes)} GEMM shapes timed in {time.perf_counter() - t0:.0f} s", flush=True)
    rates = {(r["kind"], GemmShape(**r["shape"])): r["rate"] for r in gemm_rates}
    for m in models.values():
        m["summary"] = summarize(m, rates)

    report = {
        "description": "Time split of sfc's Whisper runtime by part and ONNX op type, and "
                       "the GEMM-only limit of this CPU (ORT's own GEMMs)",
        "command": command, "machine": machine, "data": str(args.data), "limit": args.limit,
        "n_files": n_files, "profile_clips": min(args.profile_clips, n_files),
        "threads": args.threads, "models": models, "gemm_rates": gemm_rates,
    }
    print()
    show(report, args.top)
    print(line)
    print(f"command: {command}")
    write_json_atomic(args.json, report)
    print(f"wrote {args.json}")
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--model", action="append", default=None,
                        help="sfc export/build folder or zoo name, optionally LABEL=...; "
                             f"repeatable (default: {DEFAULT_MODEL})")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="manifest folder or manifest.jsonl (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=20,
                        help="time the first N utterances; 0 = all (default: %(default)s)")
    parser.add_argument("--profile-clips", type=int, default=3,
                        help="utterances of the profiler pass (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2,
                        help="intra-op threads (default: %(default)s)")
    parser.add_argument("--gemm-seconds", type=float, default=0.3,
                        help="timed seconds per GEMM microbenchmark (default: %(default)s)")
    parser.add_argument("--top", type=int, default=8,
                        help="op types shown per graph (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON,
                        help="where to write the JSON report (default: %(default)s)")
    parser.add_argument("--worker", choices=("profile", "gemm"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shapes", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.model = [parse_model_arg(m) for m in args.model or [DEFAULT_MODEL]]
    except ValueError as err:
        parser.error(str(err))
    labels = [label for label, _ in args.model]
    if len(set(labels)) != len(labels):
        parser.error(f"--model labels must differ: {', '.join(labels)}")
    if args.threads < 1 or args.profile_clips < 1 or args.top < 1 or args.gemm_seconds <= 0:
        parser.error("--threads, --profile-clips, --top and --gemm-seconds must be positive")
    if args.limit < 0:
        parser.error("--limit must be 0 (all) or positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker == "profile":
        result: Any = run_profile_worker(args.folder, args.data, args.limit,
                                         args.profile_clips, args.threads)
    elif args.worker == "gemm":
        result = run_gemm_worker(args.shapes, args.threads, args.gemm_seconds)
    else:
        return run_parent(args)
    sys.stdout.write(RESULT_MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
