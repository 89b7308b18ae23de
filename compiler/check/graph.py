"""Read-only facts about a QDQ ONNX graph that the portability rules ask for.

`GraphView.of(model)` indexes the model once: constants (initializers not shadowed by a
graph input, and Constant nodes), producers and consumers, element types and shapes
(declared, or inferred by onnx's shape inference where it can), and every
QuantizeLinear / DequantizeLinear as a `QdqNode` with its quantized type, axis, block size
and whether it quantizes a constant weight. Nodes in subgraphs (If, Loop, Scan bodies) are
included. Nothing here changes the model.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..errors import SfcError, first_line

__all__ = ["DEFAULT_DOMAINS", "GraphView", "QdqNode", "type_name"]

logger = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("", "ai.onnx")
_QDQ_OPS: dict[str, Literal["Q", "DQ"]] = {"QuantizeLinear": "Q", "DequantizeLinear": "DQ"}
Shape = tuple[int | None, ...]


def type_name(data_type: int | None) -> str:
    """'INT8' for TensorProto.INT8; 'unknown' for None."""
    if data_type is None:
        return "unknown"
    try:
        return str(TensorProto.DataType.Name(data_type))
    except ValueError:
        return f"type {data_type}"


def _attr_int(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


@dataclass(frozen=True)
class QdqNode:
    """One QuantizeLinear ("Q") or DequantizeLinear ("DQ") node of the default domain.

    `qtype`: the quantized element type (Q's output, DQ's input), None when unknown.
    `axis`: the attribute as written (ONNX default 1). `block_size`: 0 when not blocked.
    `weight`: the data is a constant (for a DQ also: a Q of a constant, the Q -> DQ form
    some exporters write for weights).
    """

    node: onnx.NodeProto
    name: str
    kind: Literal["Q", "DQ"]
    data: str
    scale: str
    zero_point: str | None
    output: str
    qtype: int | None
    axis: int
    block_size: int
    weight: bool


def _walk(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph` and every subgraph below it, depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _walk(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _walk(g)


def _constant_value(node: onnx.NodeProto) -> TensorProto | None:
    """The tensor a Constant node outputs (value, value_float(s), value_int(s))."""
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t
        if attr.name == "value_float":
            return numpy_helper.from_array(np.array(attr.f, np.float32))
        if attr.name == "value_floats":
            return numpy_helper.from_array(np.array(attr.floats, np.float32))
        if attr.name == "value_int":
            return numpy_helper.from_array(np.array(attr.i, np.int64))
        if attr.name == "value_ints":
            return numpy_helper.from_array(np.array(attr.ints, np.int64))
    return None  # sparse or string constants: never a scale or zero point


def _value_infos(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Declared value infos plus those onnx's shape inference adds (when it runs at all)."""
    graph = model.graph
    declared = [*graph.input, *graph.output, *graph.value_info]
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph.value_info
    except Exception as exc:  # too large, unknown types: the declared infos must do
        logger.debug("shape inference skipped: %s", exc)
        return declared
    return [*declared, *inferred]


@dataclass(frozen=True)
class GraphView:
    """Indexes of one model for the rules (build with `GraphView.of`)."""

    model: onnx.ModelProto
    base_dir: Path | None
    nodes: tuple[tuple[str, onnx.NodeProto], ...]
    names: dict[int, str]  # id(node) -> its name in findings
    constants: dict[str, TensorProto]
    producers: dict[str, onnx.NodeProto]
    consumers: dict[str, tuple[onnx.NodeProto, ...]]
    elem_types: dict[str, int]
    shapes: dict[str, Shape]
    qdq: tuple[QdqNode, ...] = ()
    _arrays: dict[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, model: onnx.ModelProto, base_dir: Path | None = None) -> GraphView:
        """Index `model`; `base_dir` is where its external data files live (if any)."""
        graphs = list(_walk(model.graph))
        graph_inputs = {i.name for g in graphs for i in g.input}
        constants: dict[str, TensorProto] = {}
        for g in graphs:
            for init in g.initializer:
                if init.name not in graph_inputs:  # an input may override it at run time
                    constants[init.name] = init
        nodes: list[tuple[str, onnx.NodeProto]] = []
        producers: dict[str, onnx.NodeProto] = {}
        consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for g in graphs:
            for node in g.node:
                nodes.append((node.name or f"{node.op_type}#{len(nodes)}", node))
                for out in node.output:
                    if out:
                        producers[out] = node
                for name in dict.fromkeys(node.input):
                    if name:
                        consumers[name].append(node)
                if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
                    value = _constant_value(node)
                    if value is not None and node.output:
                        constants[node.output[0]] = value
        elem_types: dict[str, int] = {}
        shapes: dict[str, Shape] = {}
        for info in _value_infos(model):
            t = info.type.tensor_type
            if not info.type.HasField("tensor_type"):
                continue
            if t.elem_type and info.name not in elem_types:
                elem_types[info.name] = t.elem_type
            if t.HasField("shape") and info.name not in shapes:
                shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                          for d in t.shape.dim)
        for name, tensor in constants.items():  # a constant's own type and dims win
            elem_types[name] = tensor.data_type
            shapes[name] = tuple(int(d) for d in tensor.dims)
        names = {id(node): name for name, node in nodes}
        view = cls(model=model, base_dir=base_dir, nodes=tuple(nodes), names=names,
                   constants=constants, producers=producers,
                   consumers={k: tuple(v) for k, v in consumers.items()},
                   elem_types=elem_types, shapes=shapes)
        return replace(view, qdq=_find_qdq(view))

    @property
    def default_opset(self) -> int | None:
        """The ai.onnx opset the model imports (None if it imports none)."""
        return next((int(o.version) for o in self.model.opset_import
                     if o.domain in DEFAULT_DOMAINS), None)

    @property
    def ir_version(self) -> int:
        """The model's IR version."""
        return int(self.model.ir_version)

    def node_name(self, node: onnx.NodeProto) -> str:
        """`node`'s name, or `<op_type>#<index>` for an unnamed node."""
        return self.names[id(node)]

    def is_constant(self, name: str) -> bool:
        """Whether `name` is a build-time constant (initializer or Constant output)."""
        return name in self.constants

    def elem_type(self, name: str | None) -> int | None:
        """The element type of tensor `name`, None when nothing declares it."""
        return None if name is None else self.elem_types.get(name)

    def shape(self, name: str) -> Shape | None:
        """The shape of `name` (None for a symbolic dim), None when unknown."""
        return self.shapes.get(name)

    def array(self, name: str) -> np.ndarray | None:
        """The value of constant `name` (external data read from `base_dir`), else None."""
        if name in self._arrays:
            return self._arrays[name]
        tensor = self.constants.get(name)
        if tensor is None:
            return None
        try:
            base = str(self.base_dir) if self.base_dir is not None else ""
            value = numpy_helper.to_array(tensor, base_dir=base)
        except Exception as exc:  # missing external file, malformed raw data
            raise SfcError(f"cannot read tensor {name!r}: {first_line(exc)}") from None
        self._arrays[name] = value
        return value


def _find_qdq(view: GraphView) -> tuple[QdqNode, ...]:
    """Every default-domain Q / DQ node of `view`, in graph order."""
    qtypes: dict[str, int | None] = {}  # Q output -> quantized type
    found: list[QdqNode] = []
    # Q nodes first: a DQ's input type may be the type of the Q that feeds it.
    ordered = sorted(view.nodes, key=lambda nn: nn[1].op_type != "QuantizeLinear")
    for name, node in ordered:
        kind = _QDQ_OPS.get(node.op_type)
        if (kind is None or node.domain not in DEFAULT_DOMAINS or len(node.input) < 2
                or not node.output):  # malformed, which onnx's checker reports: no facts here
            continue
        data, scale = node.input[0], node.input[1]
        zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
        qtype: int | None
        if kind == "Q":
            # ONNX: Q's output type is output_dtype (opset 21+), else the zero point's
            # type, else UINT8.
            out_dtype = _attr_int(node, "output_dtype", 0)
            qtype = out_dtype or (view.elem_type(zp) if zp else TensorProto.UINT8)
            qtypes[node.output[0]] = qtype
            weight = view.is_constant(data)
        else:
            qtype = qtypes.get(data) or view.elem_type(data) or view.elem_type(zp)
            producer = view.producers.get(data)
            weight = view.is_constant(data) or (
                producer is not None and producer.op_type == "QuantizeLinear"
                and view.is_constant(producer.input[0] if producer.input else ""))
        found.append(QdqNode(node=node, name=name, kind=kind, data=data, scale=scale,
                             zero_point=zp, output=node.output[0], qtype=qtype,
                             axis=_attr_int(node, "axis", 1),
                             block_size=_attr_int(node, "block_size", 0), weight=weight))
    order = {id(node): i for i, (_, node) in enumerate(view.nodes)}
    return tuple(sorted(found, key=lambda q: order[id(q.node)]))
