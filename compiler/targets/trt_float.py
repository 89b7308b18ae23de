"""Float precision of the TensorRT-ready graph: FP16 (or BF16) float layers, FP32 by rule.

A strongly typed TensorRT engine (10.12 on; always in 11) computes every layer in the type
the ONNX graph gives it, so an FP32 graph runs each unquantized layer in FP32. This pass
gives the float layers FP16 with onnxruntime's float16 converter
(`onnxruntime.transformers.float16.convert_float_to_float16`, `keep_io_types=True`: the
engine's inputs and outputs stay FP32, which is what the runtime feeds and reads), keeps in
FP32 every node a rule in `RULES` matches (the converter casts around them), and sorts the
result topologically (the converter appends its casts at the end). BF16 is the same graph
retyped from the original FP32 values.

Q/DQ nodes have no precision of their own. A DequantizeLinear whose readers all stay FP32
stays FP32, and so does the QuantizeLinear before it. Elsewhere a Q/DQ takes the float
type with its scale, so that a DQ feeds its FP16 MatMul directly: onnx-tensorrt types a DQ's
output by its scale, and NVIDIA's ModelOpt writes FP16 scales for FP16 graphs. A scale
that the float type would round by more than FP16's unit roundoff (2^-11, relative) keeps
its Q/DQ nodes in FP32 instead: FP16 subnormals, and every BF16 scale. Mixing the two
types in one Q/DQ is what TensorRT's Myelin rejects (NVIDIA/TensorRT#4832). FP16 Q/DQ need
opset 19 and BF16 graphs opset 22; older graphs are converted by onnx's version converter.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import SfcError
from ..onnx_utils import node_readers

__all__ = [
    "FLOAT_TYPES",
    "RULES",
    "FloatPrecision",
    "KeepFp32",
    "fp32_nodes",
    "lower_float",
    "with_cpu_rounding",
]

FLOAT_TYPES = ("fp32", "fp16", "bf16")
_NUMPY_TYPE = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16}
_QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})
_SCALE_RTOL = 2.0**-11  # FP16's unit roundoff: what a normal FP16 number is rounded by
_QDQ_OPSET = 19  # the first opset whose Q/DQ take FP16 data and scales
_BF16_OPSET = 22  # the first opset in which every op sfc's graphs use takes BF16 (Conv)
_ONNX_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class KeepFp32:
    """One rule: the nodes it matches compute in FP32 in an FP16/BF16 graph.

    A node matches by op type (`writes_output`: only where it writes a graph output), or,
    with `custom_domain`, by being outside the ONNX domains (a plugin declares its types).
    """

    name: str
    why: str
    op_types: frozenset[str] = frozenset()
    writes_output: bool = False
    custom_domain: bool = False

    def matches(self, node: onnx.NodeProto, graph_outputs: frozenset[str]) -> bool:
        """Whether `node` stays FP32 under this rule."""
        if self.custom_domain and node.domain not in _ONNX_DOMAINS:
            return True
        if node.op_type not in self.op_types:
            return False
        return not self.writes_output or bool(graph_outputs.intersection(node.output))


# The nodes that stay FP32, in one place; the first rule that matches a node names it.
RULES: tuple[KeepFp32, ...] = (
    KeepFp32("normalization", "mean and variance over the channels lose precision and "
             "overflow in FP16 (TensorRT's builder itself warns to keep LayerNorm in FP32)",
             op_types=frozenset({"LayerNormalization", "GroupNormalization",
                                 "InstanceNormalization", "RMSNormalization",
                                 "BatchNormalization", "LpNormalization"})),
    KeepFp32("softmax", "attention scores near FP16's limit overflow exp and the row sum; "
             "FP32 softmax costs one cast each way",
             op_types=frozenset({"Softmax", "LogSoftmax", "Hardmax"})),
    KeepFp32("reduction", "sums over long axes accumulate FP16 rounding and overflow",
             op_types=frozenset({"ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL1",
                                 "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceProd",
                                 "CumSum"})),
    KeepFp32("logits", "the projection that writes the graph's output (Whisper: logits, "
             "whose argmax FP16 rounding of close values would flip)",
             op_types=frozenset({"MatMul", "Gemm"}), writes_output=True),
    KeepFp32("plugin", "a plugin node declares its own types (sfc::W2A16MatMul: FP32 in "
             "and out)", custom_domain=True),
)


@dataclass(frozen=True)
class FloatPrecision:
    """What the pass did to one graph (for the lowering notes).

    `kept`: rule name -> nodes it kept in FP32 ("qdq": Q/DQ nodes kept FP32 for their
    readers or their scales). `casts`: Cast nodes added.
    """

    float_type: str
    kept: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    casts: int = 0
    earlier: bool = False  # the graph came with its own FP16/BF16 tensors, left as they are

    def note(self) -> str:
        """One line for the report."""
        if self.float_type == "fp32" or self.earlier:
            return f"float layers {self.float_type.upper()}" + (
                " (the graph's own types, left as they are)" if self.earlier else "")
        kept = ", ".join(f"{rule} {len(nodes)}" for rule, nodes in self.kept.items() if nodes)
        return (f"float layers {self.float_type.upper()}, FP32 by rule: {kept or 'none'} "
                f"({self.casts} casts)")


def _scale_fits(scale: np.ndarray, float_type: str) -> bool:
    """True when every scale survives `float_type` within FP16's unit roundoff."""
    values = scale.astype(np.float64).ravel()
    rounded = values.astype(_NUMPY_TYPE[float_type]).astype(np.float64)
    return bool(np.all(np.abs(rounded - values) <= _SCALE_RTOL * np.abs(values)))


def fp32_nodes(model: onnx.ModelProto, float_type: str = "fp16",
               rules: Iterable[KeepFp32] = RULES) -> dict[str, str]:
    """Node name -> the rule ("qdq" for Q/DQ nodes) that keeps it FP32 in `float_type`.

    Reads the main graph; nodes must be named (`lower_float` names the unnamed ones).
    """
    graph = model.graph
    outputs = frozenset(o.name for o in graph.output)
    rules = tuple(rules)
    kept: dict[str, str] = {}
    for node in graph.node:
        rule = next((r for r in rules if r.matches(node, outputs)), None)
        if rule is not None:
            kept[node.name] = rule.name
    inits = {i.name: i for i in graph.initializer}
    for node in graph.node:  # scales the float type cannot hold keep their Q/DQ in FP32
        scale = inits.get(node.input[1]) if node.op_type in _QDQ and len(node.input) > 1 \
            else None
        if scale is not None and not _scale_fits(numpy_helper.to_array(scale), float_type):
            kept.setdefault(node.name, "qdq")
    readers = node_readers(graph)
    changed = True
    while changed:  # a DQ follows its readers, a Q its DQs (Q -> DQ chains: a fixpoint)
        changed = False
        for node in graph.node:
            if node.op_type not in _QDQ or node.name in kept:
                continue
            users = [u for o in node.output for u in readers.get(o, [])]
            if users and all(u.name in kept for u in users):
                kept[node.name] = "qdq"
                changed = True
    # A scale shared by an FP32 and an FP16 Q/DQ would be converted for the FP16 one.
    shared = {n.input[1] for n in graph.node if n.op_type in _QDQ and n.name in kept}
    for node in graph.node:
        if node.op_type in _QDQ and len(node.input) > 1 and node.input[1] in shared:
            kept.setdefault(node.name, "qdq")
    return kept


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Give unnamed nodes unique names: the converter blocks nodes by name."""
    taken = {n.name for n in graph.node}
    for k, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{k}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def _skip_cast_pairs(model: onnx.ModelProto, own: set[str]) -> None:
    """Where the converter casts an FP32 node's output to FP16 and straight back to FP32
    (for another FP32 node or an FP32 graph output), make the second cast read the FP32
    value (in place; it becomes an FP32 -> FP32 cast that the clean-up removes). `own`: the
    graph's own node names, whose casts are left alone.

    onnxruntime's `remove_cascaded_cast_nodes` does this for every Cast -> Cast, the
    graph's own included, where it changes values (float -> int -> float truncates).
    """
    made = {o: n for n in model.graph.node for o in n.output
            if n.op_type == "Cast" and n.name not in own}
    for up in made.values():
        down = made.get(up.input[0])
        if helper.get_attribute_value(up.attribute[0]) == TensorProto.FLOAT and \
                down is not None and \
                helper.get_attribute_value(down.attribute[0]) == TensorProto.FLOAT16:
            up.input[0] = down.input[0]


def _needed_opset(model: onnx.ModelProto, float_type: str, kept: Mapping[str, str]) -> int:
    """The first opset in which the converted graph is valid ONNX: Q/DQ take FP16 from 19,
    and every op takes BF16 by 22 (Conv is the last, at 22)."""
    if float_type == "bf16":
        return _BF16_OPSET
    low_qdq = any(n.op_type in _QDQ and n.name not in kept for n in model.graph.node)
    return _QDQ_OPSET if low_qdq else 1


def _with_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """`model` at `opset` or later (onnx's version converter; IR raised to match)."""
    current = next((o.version for o in model.opset_import if o.domain in _ONNX_DOMAINS), 1)
    if current >= opset:
        return model
    converted = onnx.version_converter.convert_version(model, opset)
    ids = [helper.make_opsetid(o.domain, o.version) for o in converted.opset_import]
    converted.ir_version = max(converted.ir_version, helper.find_min_ir_version_for(ids))
    return converted


def _to_bf16(converted: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Retype the FP16 graph to BF16, in place, from the original FP32 values (no double
    rounding, no FP16 range clamp)."""
    fp32 = {i.name: i for i in original.graph.initializer if i.data_type == TensorProto.FLOAT}
    fp32_consts = {n.name: n for n in original.graph.node if n.op_type == "Constant"}

    def retype(tensor: TensorProto, source: TensorProto | None) -> None:
        if tensor.data_type != TensorProto.FLOAT16:
            return
        values = numpy_helper.to_array(source if source is not None else tensor)
        tensor.CopyFrom(numpy_helper.from_array(
            values.astype(np.float32).astype(ml_dtypes.bfloat16), tensor.name))

    for init in converted.graph.initializer:
        retype(init, fp32.get(init.name))
    for node in converted.graph.node:
        for attr in node.attribute:
            if attr.name == "to" and node.op_type == "Cast" and attr.i == TensorProto.FLOAT16:
                attr.i = TensorProto.BFLOAT16
            elif attr.type == onnx.AttributeProto.TENSOR:
                source = fp32_consts.get(node.name)
                retype(attr.t, source.attribute[0].t if source is not None
                       and source.attribute[0].type == onnx.AttributeProto.TENSOR else None)
    for info in (*converted.graph.input, *converted.graph.output, *converted.graph.value_info):
        if info.type.tensor_type.elem_type == TensorProto.FLOAT16:
            info.type.tensor_type.elem_type = TensorProto.BFLOAT16


def _low_types(model: onnx.ModelProto) -> set[str]:
    """The low-precision float types the graph already uses (initializers, casts, I/O)."""
    names = {TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}
    graph = model.graph
    found = {i.data_type for i in graph.initializer}
    found |= {a.i for n in graph.node if n.op_type == "Cast" for a in n.attribute
              if a.name == "to"}
    found |= {v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)}
    return {names[t] for t in found if t in names}


def lower_float(model: onnx.ModelProto, float_type: str = "fp16",
                rules: Iterable[KeepFp32] = RULES) -> tuple[onnx.ModelProto, FloatPrecision]:
    """`model` (FP32 float layers) with `float_type` float layers and FP32 where `rules`
    say; returns a new model and what was kept. A graph that already holds FP16 or BF16
    tensors (this pass's own output lowered again, or another tool's FP16 QDQ graph) comes
    back unchanged: its producer chose its types.

    Raises:
        SfcError: an unknown float type.
    """
    if float_type not in FLOAT_TYPES:
        raise SfcError(f"unknown float type {float_type!r} for the TensorRT-ready graph "
                       f"(expected one of {', '.join(FLOAT_TYPES)})")
    own = _low_types(model)
    if own:  # a TensorRT-ready file lowered again, or another tool's FP16 QDQ graph
        return model, FloatPrecision("/".join(sorted(own)), earlier=True)
    if float_type == "fp32":
        return model, FloatPrecision(float_type)
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    original = copy.deepcopy(model)
    _name_nodes(original.graph)
    kept = fp32_nodes(original, float_type, rules)
    work = _with_opset(copy.deepcopy(original), _needed_opset(original, float_type, kept))
    # op_block_list=[]: every FP32 node is named by a rule (the library's default list is
    # about ONNX Runtime's kernels, not TensorRT's).
    converted = OnnxModel(convert_float_to_float16(work, keep_io_types=True, op_block_list=[],
                                                   node_block_list=sorted(kept)))
    names = {n.name for n in original.graph.node}
    _skip_cast_pairs(converted.model, names)
    converted.prune_graph(allow_remove_graph_inputs=False)  # the casts skipped
    converted.disable_shape_inference()  # the clean-up reads the converter's types
    converted.remove_useless_cast_nodes()  # FP32 -> FP32 casts left by the skip
    converted.topological_sort()
    out = converted.model
    if float_type == "bf16":
        _to_bf16(out, original)
    by_rule: dict[str, list[str]] = {}
    for name, rule in kept.items():
        by_rule.setdefault(rule, []).append(name)
    casts = sum(n.op_type == "Cast" and n.name not in names for n in out.graph.node)
    return out, FloatPrecision(float_type, {r: tuple(v) for r, v in by_rule.items()}, casts)


def with_cpu_rounding(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of an FP16 graph whose every FP16 value ONNX Runtime's CPU provider rounds.

    ORT's CPU kernels are FP32: it casts an FP16 node's inputs up and its outputs down, then
    drops the casts between two such nodes (insert_cast_transformer.cc), so a chain of FP16
    nodes runs in FP32 and only the FP16 constants are rounded (measured on whisper-tiny.en:
    no FP32->FP16 cast is left). After each node's FP16 output this puts a Cast to FP16 and
    an Identity, which has an FP16 kernel: the Identity keeps the casts apart, so each
    output is stored in FP16, as on a GPU. Open it with optimization level "none" (the
    basic level removes the Identity and the FP16->FP16 cast).
    """
    out = copy.deepcopy(model)
    typed = onnx.shape_inference.infer_shapes(out).graph
    fp16 = {v.name for v in (*typed.value_info, *typed.input)
            if v.type.tensor_type.elem_type == TensorProto.FLOAT16}
    graph_outputs = {o.name for o in out.graph.output}
    renamed: dict[str, str] = {}
    nodes: list[onnx.NodeProto] = []
    for node in out.graph.node:
        for k, name in enumerate(node.input):
            node.input[k] = renamed.get(name, name)
        nodes.append(node)
        if node.op_type == "Constant":
            continue
        for name in node.output:
            if name in fp16 and name not in graph_outputs:
                nodes += [helper.make_node("Cast", [name], [f"{name}/fp16"],
                                           name=f"{name}/fp16_round", to=TensorProto.FLOAT16),
                          helper.make_node("Identity", [f"{name}/fp16"], [f"{name}/stored"],
                                           name=f"{name}/fp16_store")]
                renamed[name] = f"{name}/stored"
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out
