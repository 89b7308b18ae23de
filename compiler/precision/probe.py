"""Sensitivity probes: the task-loss increase when one weight alone takes one format.

One prepared session per graph answers every probe. Each probed weight W is replaced in
a copy of the FP32 graph by W + sum_k g_k * D_k, where D_k = dequantized(W in format k)
- W is a constant and g_k a float32 scalar graph input (0 or 1). A probe feeds g = 1 for
one (weight, format) and 0 elsewhere to the task objective ESC uses (Whisper:
teacher-forced cross-entropy on the FP32 model's own transcripts), so no graph is
rebuilt per probe, and probes of decoder weights reuse the encoder's outputs.

The proxy (`output_error`) needs no task: the layer-output error energy
tr(D^T H D) with H = X^T X / n from the calibration pass (the quantity GPTQ minimises).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..calib.esc import quantizer_key
from ..executor import Executor, InProcess
from ..progress import progress_bar
from .memo import Memo

__all__ = ["gate_name", "output_error", "run_probes", "switchable"]


def gate_name(tensor: str, k: int) -> str:
    """The graph input that switches `tensor` to its k-th format."""
    return f"{tensor}__probe{k}"


def switchable(model: onnx.ModelProto, deltas: Mapping[str, Sequence[np.ndarray]],
               gathered: Mapping[str, Sequence[np.ndarray]] | None = None,
               ) -> tuple[onnx.ModelProto, tuple[str, ...]]:
    """A copy of `model` where each weight in `deltas` reads W + sum_k gate_k * delta_k;
    returns it and the gate input names (all default to nothing: feed 0.0 for FP32).

    `gathered`: for weights whose Gather readers read another copy than the rest (the
    INT8 copy of `TargetCaps.gather_copy_int8`), the Gathers' delta per format, switched by
    the same gates (one constant per distinct array object)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    nodes: list[onnx.NodeProto] = []
    gates: list[str] = []
    renamed: dict[str, str] = {}
    renamed_gather: dict[str, str] = {}

    def switched(tensor: str, options: Sequence[np.ndarray], suffix: str) -> str:
        terms, consts = [tensor], {}
        for k, delta in enumerate(options):
            gate = gate_name(tensor, k)
            if id(delta) not in consts:
                consts[id(delta)] = f"{tensor}__{suffix}delta{k}"
                graph.initializer.append(numpy_helper.from_array(
                    np.asarray(delta, dtype=np.float32), consts[id(delta)]))
            term = f"{tensor}__{suffix}term{k}"
            nodes.append(helper.make_node("Mul", [consts[id(delta)], gate], [term],
                                          name=f"{term}_Mul"))
            terms.append(term)
        name = f"{tensor}__{suffix}probed"
        nodes.append(helper.make_node("Sum", terms, [name], name=f"{name}_Sum"))
        return name

    for tensor, options in deltas.items():
        for k in range(len(options)):
            gates.append(gate_name(tensor, k))
            graph.input.append(helper.make_tensor_value_info(
                gate_name(tensor, k), onnx.TensorProto.FLOAT, []))
        renamed[tensor] = switched(tensor, options, "")
        if gathered and tensor in gathered:
            renamed_gather[tensor] = switched(tensor, gathered[tensor], "gather_")
    for node in graph.node:
        for j, name in enumerate(node.input):
            if j == 0 and node.op_type == "Gather" and name in renamed_gather:
                node.input[j] = renamed_gather[name]
            elif name in renamed:
                node.input[j] = renamed[name]
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)
    return out, tuple(gates)


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

    `gates`: graph -> weight -> its gate inputs, probed in that order (put the encoder
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
