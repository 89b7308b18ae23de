"""Which activation quantizers carry a build's loss: leave-one-out probes on the QDQ model.

Every quantized activation t of a written QDQ model is made switchable: each of its
DequantizeLinear outputs d is replaced, for its readers, by t + g * (d - t), with g a
float32 scalar graph input (1: quantized as the recipe says, 0: left in float). One
prepared session per graph then answers every probe: the task objective (Whisper: KL to
the FP32 model on its own transcripts, teacher-forced) with every gate at 1, with every
gate at 0, and with one gate at 0 at a time. The last, subtracted from the first, is how
much of the loss keeping that one activation in float would take back.

The switch takes the Q/DQ pair out of ONNX Runtime's fused integer kernels, so the probes
see the QDQ arithmetic exactly (the `ort-cpu:avx2` weights make the fused kernels exact
too; on VNNI they are exact by construction).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx import helper

from ..calib.esc import quantizer_key, split_key
from ..errors import SfcError
from ..progress import progress_bar
from .memo import Memo

__all__ = ["ActivationProbes", "GuardConfig", "GuardResult", "gate_activations", "gate_name",
           "guard_activations", "guard_clips", "probe_activations"]


def gate_name(tensor: str) -> str:
    """The graph input that switches activation `tensor` between quantized (1) and float (0)."""
    return f"{tensor}__quantized"


def gate_activations(model: onnx.ModelProto, tensors: Collection[str]) -> onnx.ModelProto:
    """A copy of QDQ `model` whose activations in `tensors` each read
    t + gate_name(t) * (DQ(Q(t)) - t) (see the module doc); every tensor must be quantized."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    wanted = set(tensors)
    q_source = {n.output[0]: n.input[0] for n in graph.node
                if n.op_type == "QuantizeLinear" and n.input[0] in wanted}
    gated: dict[str, str] = {}  # DQ output -> its gated replacement
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        nodes.append(node)
        if node.op_type != "DequantizeLinear" or node.input[0] not in q_source:
            continue
        t, d = q_source[node.input[0]], node.output[0]
        diff, scaled, gated[d] = f"{d}__diff", f"{d}__scaled", f"{d}__gated"
        nodes += [helper.make_node("Sub", [d, t], [diff], name=f"{d}__gate_Sub"),
                  helper.make_node("Mul", [diff, gate_name(t)], [scaled],
                                   name=f"{d}__gate_Mul"),
                  helper.make_node("Add", [t, scaled], [gated[d]], name=f"{d}__gate_Add")]
    found = set(q_source.values())
    missing = sorted(wanted - found)
    if missing:
        raise ValueError(f"activation '{missing[0]}' has no Q/DQ pair in the model")
    for node in nodes:
        if node.name.endswith("__gate_Sub"):
            continue
        for j, name in enumerate(node.input):
            if name in gated:
                node.input[j] = gated[name]
    for output in graph.output:
        if output.name in gated:
            raise ValueError(f"'{output.name}' is a graph output; it cannot be gated")
    del graph.node[:]
    graph.node.extend(nodes)
    graph.input.extend(helper.make_tensor_value_info(gate_name(t), onnx.TensorProto.FLOAT, [])
                       for t in sorted(found))
    return out


@dataclass(frozen=True)
class ActivationProbes:
    """The objective with every activation quantized, with none, and with each one alone
    left in float (keyed by `quantizer_key(graph, tensor)`)."""

    quantized: float
    float_: float
    leave_one_out: dict[str, float]

    def gain(self, key: str) -> float:
        """How much of the loss keeping `key` in float takes back (may be negative)."""
        return self.quantized - self.leave_one_out[key]

    def ranked(self) -> list[tuple[str, float]]:
        """(key, gain), largest gain first (ties by key, so the order is reproducible)."""
        return sorted(((k, self.gain(k)) for k in self.leave_one_out),
                      key=lambda kv: (-kv[1], kv[0]))

    def to_dict(self) -> dict[str, Any]:
        return {"quantized": self.quantized, "float": self.float_,
                "activations": [{"graph": split_key(k)[0], "tensor": split_key(k)[1],
                                 "leave_one_out": self.leave_one_out[k], "gain": g}
                                for k, g in self.ranked()]}


@dataclass(frozen=True)
class GuardConfig:
    """The activation guard of a build with quantized activations (Whisper only): when
    quantizing the activations adds more than `allowance` nats of KL per token to what the
    quantized weights alone cost, the activations that take most of it back stay in float
    (their readers run on float inputs), at most `max_float` of them. Probes run on
    `samples` calibration clips (`guard_clips`: the ones after ESC's)."""

    # At 0.02 tiny.en's W8A8 ESC build kept nothing float and lost 1.3 WER points on one
    # seed of three; at 0.005 (4-8 kept) it is lossless on 3 seeds x 2 sets (BENCHMARKS.md,
    # issue 15).
    allowance: float = 0.005
    max_float: int = 8
    samples: int = 16

    def __post_init__(self) -> None:
        if not (isinstance(self.allowance, int | float) and self.allowance >= 0
                and self.allowance == self.allowance):
            raise SfcError(f"--act-guard-kl must be a number >= 0, not {self.allowance!r}")
        if not isinstance(self.max_float, int) or self.max_float < 0:
            raise SfcError(f"--act-guard-max must be >= 0, not {self.max_float!r}")
        if not isinstance(self.samples, int) or self.samples < 1:
            raise SfcError(f"--act-guard-samples must be >= 1, not {self.samples!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"allowance": self.allowance, "max_float": self.max_float,
                "samples": self.samples}


@dataclass(frozen=True)
class GuardResult:
    """What the guard measured and kept in float (keys `quantizer_key(graph, tensor)`).

    `steps`: the objective after each kept activation, in order; `probes`: None when the
    gap was within the allowance and no activation was probed."""

    config: GuardConfig
    quantized: float
    float_: float
    kept: tuple[str, ...]
    steps: tuple[float, ...]
    probes: ActivationProbes | None

    @property
    def final(self) -> float:
        return self.steps[-1] if self.steps else self.quantized

    @property
    def met(self) -> bool:
        return self.final - self.float_ <= self.config.allowance

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "quantized": self.quantized,
                "float": self.float_, "final": self.final, "met": self.met,
                "kept": [{"graph": split_key(k)[0], "tensor": split_key(k)[1], "kl_after": v}
                         for k, v in zip(self.kept, self.steps, strict=True)],
                "probes": None if self.probes is None else self.probes.to_dict()}


def guard_clips(count: int, skip: int, n: int) -> range:
    """Which of `count` calibration clips the guard measures on: the `n` after the first
    `skip` (those ESC tuned its scales on; a search fits its own samples, so they would
    hide the loss), or the last `n` when there are too few."""
    start = skip if count >= skip + n else max(count - n, 0)
    return range(start, min(start + n, count))


class _Measure:
    """objective(gates) with the gates of the `off` activations at 0, memoised."""

    def __init__(self, objective: Callable[[Mapping[str, float]], float],
                 keys: Sequence[str], checkpoint: Path | None, key: str) -> None:
        self.objective, self.memo = objective, Memo(checkpoint, key)
        self.gates = {k: quantizer_key(split_key(k)[0], gate_name(split_key(k)[1]))
                      for k in keys}

    def __call__(self, name: str, off: Collection[str]) -> float:
        return self.memo.get(name, lambda: self.objective(
            {gate: 0.0 if k in off else 1.0 for k, gate in self.gates.items()}))


def _leave_one_out(measure: _Measure, keys: Sequence[str], progress: bool) -> ActivationProbes:
    bar = progress_bar(enabled=progress)
    task = bar.add_task("activation probes", total=len(keys) + 2)
    with bar:
        quantized = measure("quantized", ())
        bar.advance(task)
        float_ = measure("float", keys)
        bar.advance(task)
        loo = {}
        for k in keys:
            loo[k] = measure(k, (k,))
            bar.advance(task)
    return ActivationProbes(quantized, float_, loo)


def probe_activations(objective: Callable[[Mapping[str, float]], float],
                      tensors: Mapping[str, Sequence[str]], checkpoint: Path | None = None,
                      key: str = "", progress: bool = True) -> ActivationProbes:
    """Leave-one-out probes over `tensors` (graph -> gated activations; encoder first, so
    decoder probes reuse its outputs). `checkpoint`: a JSON file updated after every probe
    and read back when its `key` matches, so an interrupted run resumes."""
    keys = [quantizer_key(g, t) for g, ts in tensors.items() for t in ts]
    return _leave_one_out(_Measure(objective, keys, checkpoint, key), keys, progress)


def guard_activations(objective: Callable[[Mapping[str, float]], float],
                      tensors: Mapping[str, Sequence[str]], config: GuardConfig,
                      checkpoint: Path | None = None, key: str = "",
                      progress: bool = True) -> GuardResult:
    """The activations to keep in float under `config` (see `GuardConfig`): nothing when
    all-quantized is within the allowance of all-float (two evaluations); else the
    leave-one-out probes rank them and the largest gains are kept one at a time, each
    step measured as a whole, until the gap is within the allowance."""
    keys = [quantizer_key(g, t) for g, ts in tensors.items() for t in ts]
    measure = _Measure(objective, keys, checkpoint, key)
    quantized, float_ = measure("quantized", ()), measure("float", keys)
    if quantized - float_ <= config.allowance or config.max_float == 0:
        return GuardResult(config, quantized, float_, (), (), None)
    probes = _leave_one_out(measure, keys, progress)
    kept: list[str] = []
    steps: list[float] = []
    for k, gain in probes.ranked():
        if gain <= 0 or len(kept) == config.max_float:
            break
        if steps and steps[-1] - float_ <= config.allowance:
            break
        kept.append(k)  # one kept: its leave-one-out probe already measured it
        steps.append(measure(k if len(kept) == 1 else "float:" + "\n".join(kept), kept))
    return GuardResult(config, quantized, float_, tuple(kept), tuple(steps), probes)
