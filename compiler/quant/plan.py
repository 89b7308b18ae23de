"""Placement: which tensors of an FP32 graph get a quantizer, and why the rest stay float.

`make_plan` walks the graph once, in order, and asks a short list of rules about each
node (the first rule with an opinion wins, as in onnxscript's rewriter):

1. `ExcludeRule`: node names matching a user pattern stay float.
2. `RotationRule`: the Hadamard MatMuls of a rotation (`quant.rotate`) stay float.
3. `WeightedOpRule`: MatMul with a constant 2-D B, Gemm with a constant B, Conv with a
   constant weight -> a weight quantizer (INT8 per-channel on the output-channel axis,
   or sub-8-bit blocks along K where the target's caps allow) and a per-tensor INT8
   quantizer on the data input.
4. `AttentionRule`: activation x activation MatMuls (QK^T, AV) -> both inputs
   quantized only when `PlanConfig.quantize_attention`.
5. `FloatRule`: everything else stays float, with a reason.

Rules read `TargetCaps`, never a target's name. Quantizers are then merged per tensor:
one quantizer per weight (shared by every weighted op reading it; consumers that would
need different layouts fall back to a common one or leave it float) and one per
activation tensor (shared by all its quantized consumers).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import onnx

from ..errors import SfcError
from ..onnx_utils import int_attr
from .rotate import PREFIX as ROTATION_PREFIX
from .spec import SCALE_BITS, SIM_CAPS, QuantSpec, TargetCaps, min_opset

__all__ = [
    "STRUCTURAL_OPS",
    "AttentionRule",
    "ExcludeRule",
    "FloatRule",
    "LayerPrecision",
    "PlacementRule",
    "Plan",
    "PlanConfig",
    "Quantizer",
    "Skipped",
    "WeightedOpRule",
    "entries_for_graph",
    "entry_graph",
    "gather_copy_spec",
    "make_plan",
    "name_nodes",
    "subgraph_reads",
]

QuantKind = Literal["weight", "activation"]

# Shape and data-movement ops: nothing to quantize, so the report does not list them.
STRUCTURAL_OPS = frozenset({
    "Constant", "ConstantOfShape", "Shape", "Size", "Reshape", "Unsqueeze", "Squeeze",
    "Flatten", "Transpose", "Concat", "Split", "Slice", "Expand", "Range", "Cast",
    "Identity", "Where", "Equal", "Less", "Greater", "Not", "And", "Or", "Tile", "Pad",
})

# Ops that run in float on every target sfc knows (TensorRT: Softmax and LayerNorm are
# float only; ORT has no quantized kernels for them either).
_FLOAT_ONLY = frozenset(
    {"LayerNormalization", "Softmax", "ReduceMean", "Sqrt", "Erf", "Pow", "Div", "Exp"}
)


def _is_pow2(value: int) -> bool:
    return value > 0 and not value & (value - 1)


FLOAT = "float"  # a layer kept in float32 (weights or activations)


def _check_weight_bits(value: object, what: str) -> None:
    if value not in (8, 4, 2) or isinstance(value, bool):
        raise SfcError(f"{what} must be 8, 4 or 2, not {value!r}")


def _check_activation_bits(value: object, what: str) -> None:
    if value is not None and (value not in (8, 4) or isinstance(value, bool)):
        raise SfcError(f"{what} must be 8, 4 or None, not {value!r}")


def _check_block_size(value: object, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not (
            value >= 16 and _is_pow2(value)):
        raise SfcError(f"{what} must be a power of two >= 16, not {value!r}")


@dataclass(frozen=True)
class LayerPrecision:
    """Per-layer precision: nodes whose name matches `pattern` (fnmatch) take these settings.

    `weights`: 8, 4, 2 or "float"; `block_size`: for 4/2-bit weights; `activations`: 8, 4
    or "float" (the input of that op left in float). None leaves the build's setting. In a
    tuple of entries, each setting comes from the first matching entry that sets it.
    """

    pattern: str
    weights: int | str | None = None
    block_size: int | None = None
    activations: int | str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise SfcError("a precision entry needs a non-empty node-name pattern")
        where = f"precision entry '{self.pattern}'"
        if self.weights is not None and self.weights != FLOAT:
            _check_weight_bits(self.weights, f"{where}: weights")
        if self.block_size is not None:
            _check_block_size(self.block_size, f"{where}: block_size")
        if self.activations is not None and self.activations != FLOAT:
            _check_activation_bits(self.activations, f"{where}: activations")

    def matches(self, node: str) -> bool:
        return fnmatch.fnmatchcase(node, self.pattern)

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "weights": self.weights,
                "block_size": self.block_size, "activations": self.activations}

    @classmethod
    def from_dict(cls, data: Any) -> LayerPrecision:
        keys = {"pattern", "weights", "block_size", "activations"}
        if not isinstance(data, dict) or not {"pattern"} <= set(data) <= keys:
            raise SfcError(f"malformed precision entry: {data!r} (keys: {', '.join(sorted(keys))})")
        return cls(data["pattern"], data.get("weights"), data.get("block_size"),
                   data.get("activations"))


# "decoder:/k_proj/MatMul": an entry for one graph of a multi-graph model, whose graphs
# can share node names (Whisper's encoder graph computes the cross-attention k/v with the
# same names as the decoder's self-attention). Exported node names start with "/".
_QUALIFIED = re.compile(r"([A-Za-z_][\w.-]*):(.+)", re.S)


def entry_graph(entry: LayerPrecision) -> str | None:
    """The graph a "GRAPH:pattern" entry is for (None: every graph)."""
    m = _QUALIFIED.fullmatch(entry.pattern)
    return m.group(1) if m else None


def entries_for_graph(entries: tuple[LayerPrecision, ...], graph: str
                      ) -> tuple[LayerPrecision, ...]:
    """The entries that apply to `graph`, a qualified entry's qualifier removed."""
    out = []
    for e in entries:
        m = _QUALIFIED.fullmatch(e.pattern)
        if m is None:
            out.append(e)
        elif m.group(1) == graph:
            out.append(replace(e, pattern=m.group(2)))
    return tuple(out)


def exact_pattern(node: str) -> str:
    """An fnmatch pattern matching exactly the node name `node` ([ is fnmatch's only
    special character inside names sfc writes; * and ? are escaped the same way)."""
    return "".join(f"[{c}]" if c in "[]*?" else c for c in node)


@dataclass(frozen=True)
class PlanConfig:
    """The user's quantization request.

    `exclude`: fnmatch patterns on node names; matching nodes stay float (and a weight
    shared with an excluded node stays float for all its consumers).
    `precision`: per-layer settings that override the uniform ones (`LayerPrecision`).
    `symmetric_blocks`: keep 4/2-bit block weights symmetric even on a target that runs
    a zero point per block (`TargetCaps.block_zero_point`), e.g. to compare the two or to
    keep one file's weights what TensorRT would take.
    `block_scale_bits`: 32, or 16 to store 4/2-bit block weights' scales as float16 values
    (`QuantSpec.scale_bits`): half the scales' bits for a scale rounding of <= 2^-11.
    """

    weight_bits: int = 8
    activation_bits: int | None = 8
    block_size: int = 32
    quantize_attention: bool = False
    exclude: tuple[str, ...] = ()
    precision: tuple[LayerPrecision, ...] = ()
    symmetric_blocks: bool = False
    block_scale_bits: int = 32

    def __post_init__(self) -> None:
        _check_weight_bits(self.weight_bits, "weight_bits")
        if self.block_scale_bits not in SCALE_BITS or isinstance(self.block_scale_bits, bool):
            raise SfcError(f"block_scale_bits must be 32, 16 or 8, not {self.block_scale_bits!r}")
        _check_activation_bits(self.activation_bits, "activation_bits")
        _check_block_size(self.block_size, "block_size")
        if not isinstance(self.precision, tuple) or not all(
                isinstance(p, LayerPrecision) for p in self.precision):
            raise SfcError("precision must be a tuple of LayerPrecision entries")
        for flag in ("quantize_attention", "symmetric_blocks"):
            if not isinstance(getattr(self, flag), bool):
                raise SfcError(f"{flag} must be a bool")
        # A bare string would silently become one pattern per character.
        if not isinstance(self.exclude, tuple) or not all(
            isinstance(p, str) and p for p in self.exclude
        ):
            raise SfcError("exclude must be a tuple of non-empty fnmatch patterns")

    def layer(self, node: str) -> tuple[int | str, int, int | str | None]:
        """(weight bits or "float", block size, activation bits / "float" / None) of `node`."""
        weights: int | str = self.weight_bits
        block = self.block_size
        acts: int | str | None = self.activation_bits
        found: set[str] = set()
        for entry in self.precision:
            if not entry.matches(node):
                continue
            if entry.weights is not None and "w" not in found:
                weights, found = entry.weights, found | {"w"}
            if entry.block_size is not None and "b" not in found:
                block, found = entry.block_size, found | {"b"}
            if entry.activations is not None and "a" not in found:
                acts, found = entry.activations, found | {"a"}
        return weights, block, acts

    def to_dict(self) -> dict[str, Any]:
        """JSON form (for the recipe's `config`); `precision`, `symmetric_blocks` and
        `block_scale_bits` only when set, so recipes of earlier builds keep their bytes."""
        data: dict[str, Any] = {
            "weight_bits": self.weight_bits,
            "activation_bits": self.activation_bits,
            "block_size": self.block_size,
            "quantize_attention": self.quantize_attention,
            "exclude": list(self.exclude),
        }
        if self.precision:
            data["precision"] = [p.to_dict() for p in self.precision]
        if self.symmetric_blocks:
            data["symmetric_blocks"] = True
        if self.block_scale_bits != 32:
            data["block_scale_bits"] = self.block_scale_bits
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlanConfig:
        """Inverse of `to_dict`; unknown keys raise SfcError."""
        known = {"weight_bits", "activation_bits", "block_size", "quantize_attention", "exclude",
                 "precision", "symmetric_blocks", "block_scale_bits"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SfcError(f"unknown plan settings: {', '.join(unknown)}")
        values = dict(data)
        if "exclude" in values:
            values["exclude"] = tuple(values["exclude"])
        if "precision" in values:
            values["precision"] = tuple(LayerPrecision.from_dict(p) for p in values["precision"])
        return cls(**values)


@dataclass(frozen=True)
class Quantizer:
    """One tensor to quantize: its spec, and the nodes that read the quantized form.

    For a weight, every reader of the initializer reads its dequantized form (so no
    float copy remains); `consumers` lists the weighted ops that asked for it.
    `gather_spec`: for a block-quantized weight that Gathers also read (a tied embedding
    table) on a target whose Gather runs only INT8 (`TargetCaps.gather_copy_int8`), the
    INT8 spec of the Gathers' own copy (`gather_copy_spec`); None: the Gathers read
    `spec` like every other reader.
    """

    tensor: str
    kind: QuantKind
    spec: QuantSpec
    consumers: tuple[str, ...]
    op_types: tuple[str, ...]
    note: str = ""
    gather_spec: QuantSpec | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("weight", "activation"):
            raise SfcError(f"quantizer kind must be weight or activation, not {self.kind!r}")
        if not self.consumers or len(self.consumers) != len(self.op_types):
            raise SfcError(f"quantizer for '{self.tensor}' needs one op type per consumer")


@dataclass(frozen=True)
class Skipped:
    """A node left in float, and why."""

    node: str
    op_type: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"node": self.node, "op_type": self.op_type, "reason": self.reason}

    @classmethod
    def from_dict(cls, data: Any) -> Skipped:
        if not isinstance(data, dict) or set(data) != {"node", "op_type", "reason"}:
            raise SfcError(f"malformed skipped entry: {data!r}")
        return cls(str(data["node"]), str(data["op_type"]), str(data["reason"]))


@dataclass(frozen=True)
class Plan:
    """Quantizers and float nodes, both in graph order."""

    quantizers: tuple[Quantizer, ...]
    skipped: tuple[Skipped, ...]

    def __post_init__(self) -> None:
        tensors = [q.tensor for q in self.quantizers]
        if len(set(tensors)) != len(tensors):
            raise SfcError("a plan holds at most one quantizer per tensor")

    @property
    def weights(self) -> tuple[Quantizer, ...]:
        return tuple(q for q in self.quantizers if q.kind == "weight")

    @property
    def activations(self) -> tuple[Quantizer, ...]:
        """The tensors calibration must observe."""
        return tuple(q for q in self.quantizers if q.kind == "activation")

    def get(self, tensor: str) -> Quantizer | None:
        """The quantizer of `tensor`, if any."""
        return next((q for q in self.quantizers if q.tensor == tensor), None)


# --- graph facts and rules -------------------------------------------------------------


@dataclass(frozen=True)
class GraphFacts:
    """What the rules may ask about the graph (top-level graph only)."""

    initializers: Mapping[str, onnx.TensorProto]  # constants: initializers that are not inputs
    outputs: frozenset[str]
    readers: Mapping[str, tuple[int, ...]]  # tensor -> indices of top-level nodes reading it
    in_subgraphs: frozenset[str]  # names read inside If/Loop/Scan bodies

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> GraphFacts:
        inputs = {i.name for i in graph.input}
        readers: dict[str, list[int]] = {}
        for index, node in enumerate(graph.node):
            for name in dict.fromkeys(node.input):  # a node reading a tensor twice counts once
                if name:
                    readers.setdefault(name, []).append(index)
        return cls(
            initializers={t.name: t for t in graph.initializer if t.name not in inputs},
            outputs=frozenset(o.name for o in graph.output),
            readers={k: tuple(v) for k, v in readers.items()},
            in_subgraphs=frozenset(subgraph_reads(graph)),
        )

    def is_constant(self, name: str) -> bool:
        return name in self.initializers


def subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Names read by nodes inside If / Loop / Scan bodies (recursively)."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            bodies = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
            for body in bodies:
                for inner in body.node:
                    names.update(inner.input)
                names |= subgraph_reads(body)
    return names


@dataclass(frozen=True)
class _Context:
    facts: GraphFacts
    config: PlanConfig
    caps: TargetCaps


@dataclass(frozen=True)
class _Match:
    """A node a rule wants quantized."""

    node: str
    op_type: str
    activations: tuple[str, ...]  # candidate activation tensors at this node
    weight: str | None = None  # None for activation x activation MatMuls
    spec: QuantSpec | None = None
    fallback: QuantSpec | None = None  # INT8 per-channel spec, when weights must agree
    note: str = ""


class PlacementRule(Protocol):
    """A rule: `apply` returns a match, a skip with its reason, or None (no opinion)."""

    @property
    def name(self) -> str: ...

    def apply(self, node: onnx.NodeProto, ctx: _Context) -> _Match | Skipped | None: ...


@dataclass(frozen=True)
class ExcludeRule:
    """Nodes whose name matches one of the user's patterns stay float."""

    patterns: tuple[str, ...]
    name: str = "exclude"

    def apply(self, node: onnx.NodeProto, ctx: _Context) -> _Match | Skipped | None:
        for pattern in self.patterns:
            if fnmatch.fnmatchcase(node.name, pattern):
                return Skipped(node.name, node.op_type, f"excluded by pattern '{pattern}'")
        if node.op_type in ("MatMul", "Gemm", "Conv") and ctx.config.layer(node.name)[0] == FLOAT:
            entry = next(p for p in ctx.config.precision
                         if p.matches(node.name) and p.weights is not None)
            return Skipped(node.name, node.op_type,
                           f"kept float by precision entry '{entry.pattern}'")
        return None


@dataclass(frozen=True)
class RotationRule:
    """The 32 x 32 Hadamard MatMuls a rotation adds (`quant.rotate`) stay float: they mix
    an activation's channels before a low-bit weight reads them."""

    name: str = "rotation"

    def apply(self, node: onnx.NodeProto, ctx: _Context) -> _Match | Skipped | None:
        if node.op_type == "MatMul" and node.name.startswith(ROTATION_PREFIX):
            return Skipped(node.name, node.op_type, "Hadamard rotation of a weight's input: "
                           "stays float")
        return None


@dataclass(frozen=True)
class WeightedOpRule:
    """MatMul / Gemm / Conv with a constant float weight."""

    name: str = "weighted-op"

    def apply(self, node: onnx.NodeProto, ctx: _Context) -> _Match | Skipped | None:
        op = node.op_type
        if node.domain not in ("", "ai.onnx") or op not in ("MatMul", "Gemm", "Conv"):
            return None
        facts = ctx.facts
        if len(node.input) < 2:
            return None
        data, weight = node.input[0], node.input[1]

        def skip(reason: str) -> Skipped:
            return Skipped(node.name, op, reason)

        if not facts.is_constant(weight):
            if op != "MatMul":
                return skip(f"weight input '{weight}' is not a constant initializer")
            if facts.is_constant(data):
                return skip(f"constant input A '{data}': only B[K, N] MatMul weights are quantized")
            return None  # activation x activation: the attention rule decides
        if facts.is_constant(data):
            return skip("both inputs are constants (constant-fold the graph first)")
        tensor = facts.initializers[weight]
        rank = len(tensor.dims)
        if tensor.data_type != onnx.TensorProto.FLOAT:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).name
            return skip(f"weight '{weight}' is {dtype}, not float32")
        if op == "MatMul" and rank != 2:
            return skip(f"weight '{weight}' has rank {rank}; MatMul weights must be 2-D [K, N]")
        if op == "Conv" and rank < 3:
            return skip(f"weight '{weight}' has rank {rank}; Conv weights are [M, C/g, k...]")
        if weight in facts.outputs:
            return skip(f"weight '{weight}' is also a graph output")
        if weight in facts.in_subgraphs:
            return skip(f"weight '{weight}' is also read inside a subgraph")

        # (output-channel axis, reduction axis K) of the weight.
        if op == "MatMul":
            out_axis, k_axis = 1, 0
        elif op == "Gemm":
            out_axis, k_axis = (0, 1) if int_attr(node, "transB", 0) else (1, 0)
        else:
            out_axis, k_axis = 0, 1
        layer_bits, block_size, _ = ctx.config.layer(node.name)
        bits, caps = int(layer_bits), ctx.caps  # "float" never gets here (ExcludeRule)
        per_channel = QuantSpec(8, "channel", axis=out_axis,
                                pair_limit=caps.int8_weight_pair_limit)
        if bits == 8:
            return _Match(node.name, op, (data,), weight, per_channel, per_channel)
        block = QuantSpec(bits, "block", axis=k_axis, block_size=block_size,
                          zero_point=caps.block_zero_point and not ctx.config.symmetric_blocks,
                          scale_bits=ctx.config.block_scale_bits)
        multiple, last = caps.last_dim_multiple(bits), int(tensor.dims[-1])
        if op not in caps.block_weight_ops:
            why = f"{caps.name} has no block-quantized {op}"
        elif min_opset(block) > caps.max_opset:
            why = f"INT{bits} needs opset {min_opset(block)} > {caps.name}'s {caps.max_opset}"
        elif last % multiple:
            why = f"{caps.name} needs INT{bits} weights' last dim ({last}) a multiple of {multiple}"
        else:
            note = ""
            if caps.block_weight_only:
                note = f"weight-only: {caps.name} runs block-quantized {op} on float activations"
            return _Match(node.name, op, (data,), weight, block, per_channel, note)
        if 8 not in caps.weight_bits:
            return skip(f"{why}, and no INT8 weights either")
        note = f"INT{bits} fell back to INT8 per-channel: {why}"
        return _Match(node.name, op, (data,), weight, per_channel, per_channel, note)


@dataclass(frozen=True)
class AttentionRule:
    """MatMul of two activations (attention QK^T and AV)."""

    name: str = "attention"

    def apply(self, node: onnx.NodeProto, ctx: _Context) -> _Match | Skipped | None:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            return None
        if not ctx.config.quantize_attention:
            reason = "activation x activation MatMul (attention): set quantize_attention"
            return Skipped(node.name, node.op_type, reason)
        if ctx.config.layer(node.name)[2] in (None, FLOAT):
            reason = "activation x activation MatMul: activation_bits is None"
            return Skipped(node.name, node.op_type, reason)
        inputs = tuple(dict.fromkeys(node.input[:2]))
        return _Match(node.name, node.op_type, inputs)


@dataclass(frozen=True)
class FloatRule:
    """Everything else stays float; arithmetic is listed with a reason, while shape and
    data-movement ops (no arithmetic to quantize) are not listed at all."""

    name: str = "float"

    def apply(self, node: onnx.NodeProto, ctx: _Context) -> _Match | Skipped | None:
        if node.op_type in STRUCTURAL_OPS:
            return None
        if node.op_type in _FLOAT_ONLY:
            reason = f"{node.op_type} runs in float on every target"
        else:
            reason = f"no quantized placement for {node.op_type}: stays float"
        return Skipped(node.name, node.op_type, reason)


# --- the planner -----------------------------------------------------------------------


def _check_names(graph: onnx.GraphProto) -> None:
    seen: set[str] = set()
    for index, node in enumerate(graph.node):
        if not node.name:
            hint = "name nodes first (sfc.quant.name_nodes)"
            raise SfcError(f"node {index} ({node.op_type}) has no name; {hint}")
        if node.name in seen:
            raise SfcError(f"node name '{node.name}' is used twice; node names must be unique")
        seen.add(node.name)


def check_caps(config: PlanConfig, caps: TargetCaps) -> None:
    """SfcError unless the target runs the requested weight and activation bit-widths
    (the uniform ones and every per-layer entry's)."""
    weight_bits = {config.weight_bits} | {
        p.weights for p in config.precision if isinstance(p.weights, int)}
    for bits in sorted(weight_bits, reverse=True):
        if bits not in caps.weight_bits:
            supported = ", ".join(str(b) for b in sorted(caps.weight_bits)) or "none"
            raise SfcError(
                f"target {caps.name} does not run {bits}-bit weights (runs: {supported})")
    act_bits = {config.activation_bits} | {
        p.activations for p in config.precision if isinstance(p.activations, int)}
    for bits in sorted(b for b in act_bits if isinstance(b, int)):
        if bits not in caps.activation_bits:
            supported = ", ".join(str(b) for b in sorted(caps.activation_bits)) or "none"
            hint = "; --target sim evaluates them as fake quantization" if (
                bits in SIM_CAPS.activation_bits) else ""
            raise SfcError(f"target {caps.name} does not run {bits}-bit "
                           f"activations (runs: {supported}){hint}")


def _plugin_only_readers(weight: str, facts: GraphFacts, graph: onnx.GraphProto) -> bool:
    """Whether every reader of `weight` is a MatMul taking it as its weight (input 1)."""
    return all(graph.node[i].op_type == "MatMul" and graph.node[i].input[1] == weight
               and graph.node[i].input[0] != weight for i in facts.readers.get(weight, ()))


def _resolve_weights(
    matches: list[_Match], facts: GraphFacts, excluded: Mapping[str, str], graph: onnx.GraphProto,
    caps: TargetCaps,
) -> tuple[dict[str, tuple[QuantSpec, str]], dict[str, str]]:
    """One spec per weight tensor. Returns (weight -> (spec, note), dropped node -> reason)."""
    by_weight: dict[str, list[_Match]] = {}
    for m in matches:
        if m.weight is not None:
            by_weight.setdefault(m.weight, []).append(m)
    chosen: dict[str, tuple[QuantSpec, str]] = {}
    dropped: dict[str, str] = {}
    for weight, group in by_weight.items():
        readers = [graph.node[i].name for i in facts.readers.get(weight, ())]
        blocked = next((r for r in readers if r in excluded), None)
        if blocked is not None:
            for m in group:
                dropped[m.node] = f"weight '{weight}' is shared with excluded node '{blocked}'"
            continue
        specs = {m.spec for m in group}
        notes = [m.note for m in group if m.note]
        if len(specs) == 1:
            spec = group[0].spec
            assert spec is not None
            if (spec.bits in caps.plugin_weight_bits and group[0].fallback is not None
                    and not _plugin_only_readers(weight, facts, graph)):
                chosen[weight] = (group[0].fallback,
                                  f"INT{spec.bits} fell back to INT8 per-channel: {caps.name} "
                                  f"runs INT{spec.bits} only as a MatMul plugin, and "
                                  f"'{weight}' has other readers")
                continue
            chosen[weight] = (spec, notes[0] if notes else "")
            continue
        fallbacks = {m.fallback for m in group}
        if len(fallbacks) == 1 and group[0].fallback is not None:
            note = "consumers need different layouts: INT8 per-channel for all"
            chosen[weight] = (group[0].fallback, note)
            continue
        for m in group:
            dropped[m.node] = f"weight '{weight}' is shared by ops needing different axes"
    return chosen, dropped


def make_plan(model: onnx.ModelProto, config: PlanConfig, caps: TargetCaps) -> Plan:
    """Decide which tensors of `model` (FP32) get quantizers, under `caps`.

    Pure: reads the model, returns a `Plan`. Raises SfcError when the config asks for
    bit-widths the target does not run, or when node names are missing or repeated.
    """
    check_caps(config, caps)
    graph = model.graph
    _check_names(graph)
    ctx = _Context(GraphFacts.of(graph), config, caps)
    rules: tuple[PlacementRule, ...] = (
        ExcludeRule(config.exclude),
        RotationRule(),
        WeightedOpRule(),
        AttentionRule(),
        FloatRule(),
    )

    decisions: list[_Match | Skipped] = []
    excluded: dict[str, str] = {}
    for node in graph.node:
        for rule in rules:
            outcome = rule.apply(node, ctx)
            if outcome is not None:
                decisions.append(outcome)
                if isinstance(rule, ExcludeRule) and isinstance(outcome, Skipped):
                    excluded[node.name] = outcome.reason
                break
    matches = [d for d in decisions if isinstance(d, _Match)]
    weights, dropped = _resolve_weights(matches, ctx.facts, excluded, graph, caps)

    skipped: list[Skipped] = []
    weight_q: dict[str, _Acc] = {}
    act_q: dict[str, _Acc] = {}
    order: list[tuple[QuantKind, str]] = []  # first appearance, graph order
    for d in decisions:
        if isinstance(d, Skipped):
            skipped.append(d)
            continue
        if d.node in dropped:
            skipped.append(Skipped(d.node, d.op_type, dropped[d.node]))
            continue
        act_bits = config.layer(d.node)[2]
        act_spec = QuantSpec(act_bits, "tensor") if isinstance(act_bits, int) else None
        activations = d.activations
        if d.weight is not None:
            spec, note = weights[d.weight]
            if act_spec is None or (spec.granularity == "block" and caps.block_weight_only):
                activations = ()
        for tensor in activations:
            if act_spec is None:
                break
            if tensor not in act_q:
                act_q[tensor] = _Acc(act_spec, "")
                order.append(("activation", tensor))
            elif act_q[tensor].spec != act_spec:
                raise SfcError(f"consumers of '{tensor}' ask for different activation bits "
                               f"({act_q[tensor].spec.bits} and {act_spec.bits}); give them "
                               "one precision entry")
            act_q[tensor].add(d.node, d.op_type)
        if d.weight is not None:
            if d.weight not in weight_q:
                weight_q[d.weight] = _Acc(spec, note)
                order.append(("weight", d.weight))
            weight_q[d.weight].add(d.node, d.op_type)

    quantizers = []
    for kind, tensor in order:
        acc = (weight_q if kind == "weight" else act_q)[tensor]
        gather = gather_copy_spec(graph, tensor, acc.spec, caps) if kind == "weight" else None
        quantizers.append(Quantizer(tensor, kind, acc.spec, tuple(acc.consumers),
                                    tuple(acc.op_types), acc.note, gather))
    return Plan(tuple(quantizers), tuple(skipped))


GATHER_BLOCK = 32  # the Gathers' INT8 copy: one scale per 32 values of a gathered row


def gather_copy_spec(graph: onnx.GraphProto, weight: str, spec: QuantSpec,
                     caps: TargetCaps) -> QuantSpec | None:
    """The INT8 spec of the Gathers' own copy of `weight` when it takes `spec` on a target
    with `caps` (see `Quantizer.gather_spec`), or None: not block-quantized, no copy on
    this target, no Gather reading it, or Gathers on different axes.

    INT8 in blocks of 32 along each gathered row (the ort-cpu rewrite dequantizes them
    exactly), or one scale per row where 32 does not divide it. Whisper's token table has
    outlier dimensions (one dimension's absmax is 9x the median's on tiny.en), so one
    scale per row costs 3% relative error against 1% in blocks of 32.
    """
    if not caps.gather_copy_int8 or spec.granularity != "block":
        return None
    axes = {int_attr(n, "axis", 0) for n in graph.node
            if n.op_type == "Gather" and n.input and n.input[0] == weight}
    init = next((t for t in graph.initializer if t.name == weight), None)
    if len(axes) != 1 or init is None or len(init.dims) != 2:
        return None
    axis = axes.pop() % 2
    if init.dims[1 - axis] % GATHER_BLOCK:
        return QuantSpec(8, "channel", axis=axis)
    return QuantSpec(8, "block", axis=1 - axis, block_size=GATHER_BLOCK)


@dataclass
class _Acc:
    """Consumers gathered for one quantizer while walking the graph."""

    spec: QuantSpec
    note: str
    consumers: list[str] = field(default_factory=list)
    op_types: list[str] = field(default_factory=list)

    def add(self, node: str, op_type: str) -> None:
        self.consumers.append(node)
        self.op_types.append(op_type)


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose top-level nodes all have unique names.

    Unnamed nodes become f"{op_type}_{index}"; a repeated name gets f"__{index}" appended.
    Deterministic, so a recipe made on the named model replays on a re-named copy.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    taken = {n.name for n in out.graph.node if n.name}
    seen: set[str] = set()
    for index, node in enumerate(out.graph.node):
        name = node.name or f"{node.op_type}_{index}"
        while name in seen or (not node.name and name in taken):
            name = f"{name}__{index}"
        node.name = name
        seen.add(name)
    return out
