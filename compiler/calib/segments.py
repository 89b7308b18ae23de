"""A gated graph run from the last cut before its first switched-off gate.

The activation guard's probes (`precision.activations`) switch one quantizer at a time off
(its gate input at 0); every node before the first reader of that gate computes what it
computed with every gate on. `SegmentedSession` splits the graph at single-tensor cuts (a
tensor that is the only one computed so far that a later node or an output still reads,
like a transformer's residual stream between blocks), keeps each cut's value from the
runs whose gates up to it are all on (one file per input and cut, so memory stays
bounded), and starts a probe at the last cut before its first switched-off gate. Same
nodes, same kernels and the same inputs to each: whisper-base's encoder probes (24 of
them, 16 windows each) were most of its build's guard (BENCHMARKS.md, issue 13).
"""

from __future__ import annotations

import hashlib
import itertools
import tempfile
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

__all__ = ["Opener", "Segment", "SegmentedSession", "gate_cuts", "single_tensor_cuts", "split_at"]


def _static(graph: onnx.GraphProto) -> set[str]:
    """Tensors that do not depend on any graph input: initializers, Constant outputs and
    what is computed from them alone (a segment recomputes the ones it reads)."""
    static = {t.name for t in graph.initializer}
    for node in graph.node:
        if all(not t or t in static for t in node.input):
            static.update(t for t in node.output if t)
    return static


def single_tensor_cuts(graph: onnx.GraphProto) -> list[tuple[int, str]]:
    """(i, t) for each tensor t that, right after node i (graph order, which ONNX keeps
    topological) produced it, is the only graph-input-dependent tensor that a later node or
    a graph output still reads: everything after node i depends on the graph inputs only
    through t (graph inputs themselves are read directly)."""
    static = _static(graph)
    inputs = {i.name for i in graph.input}
    producer = {t: i for i, n in enumerate(graph.node) for t in n.output if t}
    last: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for t in node.input:
            if producer.get(t, -1) >= i:
                raise ValueError(f"node {node.name!r} reads {t!r} before it is made: the "
                                 "graph is not in topological order")
            if t and t not in static and t not in inputs:
                last[t] = i
    for output in graph.output:
        last[output.name] = len(graph.node)
    live: set[str] = set()
    cuts: list[tuple[int, str]] = []
    for i, node in enumerate(graph.node):
        made = [t for t in node.output if t in last]
        live = {t for t in live | set(made) if last[t] > i}
        if len(live) == 1 and set(made) == live:
            cuts.append((i, made[0]))
    return cuts


def gate_cuts(graph: onnx.GraphProto, gates: Sequence[str],
              allowed: Collection[str] | None = None) -> list[str]:
    """For each gate input, the last single-tensor cut (among `allowed`, if given) made
    before its first reader; in graph order, without repeats (a gate read before every cut
    has none)."""
    first: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for t in node.input:
            first.setdefault(t, i)
    cuts = [c for c in single_tensor_cuts(graph) if allowed is None or c[1] in allowed]
    chosen = set()
    for gate in gates:
        if gate not in first:
            continue
        before = [c for c in cuts if c[0] < first[gate]]
        if before:
            chosen.add(before[-1])
    return [t for _, t in sorted(chosen)]


@dataclass(frozen=True)
class Segment:
    """The nodes from cut `start` (None: the graph's inputs) to cut `end` (None: the
    graph's outputs), as a model of their own; `inputs`: its graph inputs."""

    start: str | None
    end: str | None
    model: onnx.ModelProto
    inputs: frozenset[str]


def _types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Every tensor's type, by shape inference on a weightless copy (initializers become
    typed inputs, so a large model is not copied)."""
    graph = model.graph
    inits = [helper.make_tensor_value_info(t.name, t.data_type, t.dims)
             for t in graph.initializer]
    light = helper.make_model(helper.make_graph(graph.node, graph.name,
                                                [*graph.input, *inits], graph.output),
                              opset_imports=model.opset_import, ir_version=model.ir_version)
    inferred = onnx.shape_inference.infer_shapes(light).graph
    return {v.name: v.type for v in [*inferred.value_info, *inferred.input, *inferred.output]}


def split_at(model: onnx.ModelProto, cuts: Sequence[str],
             types: Mapping[str, onnx.TypeProto] | None = None) -> list[Segment]:
    """`model` as len(cuts) + 1 segments, each reading the previous cut (see the module
    doc); the cuts must be single-tensor cuts of the graph, in graph order. `types`: the
    cut tensors' types (default: by shape inference on `model`)."""
    graph = model.graph
    known = {t for _, t in single_tensor_cuts(graph)}
    bad = [c for c in cuts if c not in known]
    if bad:
        raise ValueError(f"'{bad[0]}' is not a single-tensor cut of the graph")
    producer = {t: i for i, n in enumerate(graph.node) for t in n.output if t}
    types = _types(model) if types is None else types
    inits = {t.name: t for t in graph.initializer}
    graph_inputs = {i.name: i for i in graph.input}
    bounds: list[str | None] = [None, *cuts, None]
    segments: list[Segment] = []
    for start, end in itertools.pairwise(bounds):
        wanted = [end] if end is not None else [o.name for o in graph.output]
        stop = set(graph_inputs) | ({start} if start is not None else set())
        reach: set[int] = set()
        stack = list(wanted)
        while stack:
            t = stack.pop()
            if t in stop or t in inits or t not in producer or producer[t] in reach:
                continue
            reach.add(producer[t])
            stack.extend(x for x in graph.node[producer[t]].input if x)
        nodes = [graph.node[i] for i in sorted(reach)]
        read = {x for n in nodes for x in n.input if x}
        inputs = [graph_inputs[n] for n in graph_inputs if n in read and n not in inits]
        if start is not None:
            inputs.insert(0, helper.make_value_info(start, types[start]))
        outputs = ([helper.make_value_info(end, types[end])] if end is not None
                   else list(graph.output))
        sub = helper.make_graph(nodes, f"{graph.name}_{len(segments)}", inputs, outputs,
                                initializer=[inits[n] for n in sorted(read & set(inits))])
        segment = helper.make_model(sub, opset_imports=model.opset_import,
                                    ir_version=model.ir_version)
        segments.append(Segment(start, end, segment, frozenset(i.name for i in inputs)))
    return segments


def _digest(feed: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(feed):
        value = np.ascontiguousarray(feed[name])
        h.update(f"{name}\0{value.dtype.str}\0{value.shape}\0".encode())
        h.update(value.tobytes())
    return h.hexdigest()[:32]


# open_session(serialized model, ORT level (None: the caller's), path to write ORT's
# optimized graph to or None, whether the session allocates from ORT's shared arena)
Opener = Callable[[bytes, str | None, str | None, bool], ort.InferenceSession]


class SegmentedSession:
    """ONNX Runtime sessions for the segments of a gated graph (see the module doc).

    ORT optimizes the whole graph once (at the caller's level) and the segments are cut
    from its optimized graph, then opened with no further optimization: a fusion decided
    on a segment alone can differ from the whole graph's (the graph's last residual Add
    and LayerNormalization fuse on their own but not in whisper-tiny.en's encoder, and the
    cross K/V moved by up to 0.012 on a random window), so each segment runs the whole
    graph's kernels. `run` takes the graph's data inputs and its gates (float32 scalars,
    1: on); the cut values of runs whose gates up to that cut were all on are kept in a
    temporary folder, one file per data feed and cut, until `close`."""

    def __init__(self, model: onnx.ModelProto, gates: Sequence[str],
                 open_session: Opener) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="sfc-cuts-")
        types = _types(model)  # the original graph's: ORT's contrib ops have no inference
        optimized = Path(self._tmp.name) / "optimized.onnx"
        open_session(model.SerializeToString(), None, str(optimized), False)
        whole = onnx.load(str(optimized))
        optimized.unlink()
        self.segments = split_at(whole, gate_cuts(whole.graph, gates, types), types)
        del whole
        self.gates = [frozenset(g for g in gates if g in s.inputs) for s in self.segments]
        # Segments run in turn: one shared arena's worth, not one each (tiny.en's 12 held
        # 1.5 GB against 0.46 GB for the whole graph; without an arena: 1.9x slower).
        self.sessions = [open_session(s.model.SerializeToString(), "none", None, True)
                         for s in self.segments]

    def _path(self, digest: str, index: int) -> Path:
        return Path(self._tmp.name) / f"{digest}-{index}.npy"

    def run(self, outputs: Sequence[str] | None, feed: Mapping[str, np.ndarray],
            gates: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The graph's `outputs` (None: all) for data `feed` and `gates`."""
        last = len(self.segments) - 1
        off = next((j for j, names in enumerate(self.gates)
                    if any(float(gates[g]) != 1.0 for g in names)), last + 1)
        digest = _digest(feed)
        start, value = 0, np.empty(0)
        for j in range(min(off, last), 0, -1):  # segment j reads the cut segment j-1 made
            if self._path(digest, j).exists():
                start, value = j, np.load(self._path(digest, j))
                break
        everything = {**feed, **gates}
        for j in range(start, last + 1):
            segment = self.segments[j]
            run_feed = {k: v for k, v in everything.items() if k in segment.inputs}
            if segment.start is not None:
                run_feed[segment.start] = value
            if j == last:
                return list(self.sessions[j].run(None if outputs is None else list(outputs),
                                                 run_feed))
            value = self.sessions[j].run([segment.end], run_feed)[0]
            if j < off and not self._path(digest, j + 1).exists():
                np.save(self._path(digest, j + 1), value)  # gates up to here all on
        raise AssertionError("unreachable: the last segment returns")

    def close(self) -> None:
        """Release the sessions and the kept cut values."""
        self.sessions = []
        self._tmp.cleanup()
