"""Sensitivity probes: the task-loss increase when one weight alone takes one format.

One prepared session per graph answers every probe. Each probed weight W is an overridable
initializer of a copy of the FP32 graph (a graph input whose default is W), and each of its
formats k has a gate: a float32 scalar in the objective's mapping, 0 or 1. A probe feeds
the weight dequantized from format k in W's place for the one (weight, format) whose gate
is 1 (`calib.objectives.switch_feed`) to the task objective ESC uses (Whisper: teacher-forced
cross-entropy on the FP32 model's own transcripts), so no graph is rebuilt per probe, and
probes of decoder weights reuse the encoder's outputs.

The session holds the FP32 weights once; each format lives beside it as its int8 integers
and scales (`quant.weights.Rounded`, the build's own cached arrays), dequantized when a
probe feeds it. The graph used to compute W + sum_k g_k * D_k itself from a constant D_k per
format, so every copy of the graph held every format of every weight (a Ray probe worker:
3.5 GB for whisper-tiny.en, 5.8 GB for whisper-base); then a float32 array per format beside
the session (BENCHMARKS.md, issue 16).

The proxy (`output_error`) needs no task: the layer-output error energy
tr(D^T H D) with H = X^T X / n from the calibration pass (the quantity GPTQ minimises).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..calib.esc import quantizer_key
from ..calib.objectives import Switch
from ..executor import Executor, InProcess
from ..progress import progress_bar
from ..quant.weights import Rounded
from .memo import Memo

__all__ = ["ProbeGraph", "gate_name", "output_error", "run_probes", "switchable"]


def gate_name(tensor: str, k: int) -> str:
    """The gate that switches `tensor` to its k-th format."""
    return f"{tensor}__probe{k}"


@dataclass(frozen=True)
class ProbeGraph:
    """A graph whose probed weights are overridable initializers, and per gate what to
    feed in their place when it is on (`switchable`)."""

    model: onnx.ModelProto
    switches: Mapping[str, Switch]

    @property
    def gates(self) -> tuple[str, ...]:
        return tuple(self.switches)


def switchable(model: onnx.ModelProto, formats: Mapping[str, Sequence[Rounded]],
               gathered: Mapping[str, Sequence[Rounded]] | None = None) -> ProbeGraph:
    """A copy of `model` where each weight in `formats` is an overridable initializer, with
    a gate per format k that feeds formats[W][k] dequantized in its place.

    `gathered`: for weights whose Gather readers read another copy than the rest (the
    INT8 copy of `TargetCaps.gather_copy_int8`), what the Gathers read at each format: the
    Gathers then read their own overridable copy of W, switched by the same gates."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    switches: dict[str, list[tuple[str, Rounded]]] = {}

    def overridable(name: str, tensor: onnx.TensorProto) -> None:
        graph.input.append(helper.make_tensor_value_info(name, tensor.data_type,
                                                         list(tensor.dims)))

    gather_copies: dict[str, str] = {}
    for tensor, options in formats.items():
        overridable(tensor, inits[tensor])
        for k, rounded in enumerate(options):
            switches[gate_name(tensor, k)] = [(tensor, rounded)]
        if gathered and tensor in gathered:
            copy = f"{tensor}__gather"
            graph.initializer.append(numpy_helper.from_array(
                numpy_helper.to_array(inits[tensor]), copy))
            overridable(copy, inits[tensor])
            gather_copies[tensor] = copy
            for k, rounded in enumerate(gathered[tensor]):
                switches[gate_name(tensor, k)].append((copy, rounded))
    for node in graph.node:
        if node.op_type == "Gather" and node.input[0] in gather_copies:
            node.input[0] = gather_copies[node.input[0]]
    return ProbeGraph(out, {g: tuple(pairs) for g, pairs in switches.items()})


def output_error(delta: np.ndarray, gram: np.ndarray, count: int) -> float:
    """tr(D^T H D), H = gram / count: the mean squared change of the layer's output rows
    (summed over output channels) that `delta` causes on the calibration inputs."""
    d = np.asarray(delta, dtype=np.float64)
    return float(np.einsum("kn,kn->", np.asarray(gram, np.float64) @ d, d) / max(count, 1))


def run_probes(objective: Callable[[Mapping[str, float]], float],
               gates: Mapping[str, Mapping[str, Sequence[str]]],
               checkpoint: Path | None = None, key: str = "",
               progress: bool = True, executor: Executor | None = None,
               ) -> tuple[float, dict[str, dict[str, list[float]]]]:
    """(FP32 objective, graph -> weight -> [loss increase per format]).

    `gates`: graph -> weight -> its gates, probed in that order (put the encoder
    first, so decoder probes reuse its outputs). `checkpoint`: a JSON file updated after
    every probe and read back when its `key` matches, so an interrupted search resumes.
    `executor`: evaluates the probes not yet measured (`sfc.executor`: Ray workers, say;
    None: `objective`, here); its values come back in probe order, so the result is the
    same either way.
    """
    zero = {quantizer_key(g, gate): 0.0 for g, ws in gates.items()
            for names in ws.values() for gate in names}
    feeds = {"fp32": zero} | {quantizer_key(g, gate): {**zero, quantizer_key(g, gate): 1.0}
                              for g, ws in gates.items() for names in ws.values()
                              for gate in names}
    memo = Memo(checkpoint, key)
    todo = [name for name in feeds if name not in memo.done]
    runner = InProcess(objective) if executor is None else executor

    bar = progress_bar(enabled=progress)
    task = bar.add_task("precision: sensitivity probes", total=len(feeds),
                        completed=len(feeds) - len(todo))
    with bar:
        for name, value in zip(todo, runner.evaluate([feeds[n] for n in todo]), strict=True):
            memo.put(name, value)
            bar.advance(task)
    base = memo.done["fp32"]
    out = {g: {tensor: [memo.done[quantizer_key(g, gate)] - base for gate in names]
               for tensor, names in weights.items()} for g, weights in gates.items()}
    return base, out
