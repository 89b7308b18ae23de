"""Small ONNX helpers shared by passes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from google.protobuf import unknown_fields
from google.protobuf.message import Message
from onnx import numpy_helper

from .errors import SfcError

__all__ = ["inferred_shapes", "int_attr", "ints_attr", "node_readers", "with_weights"]


def int_attr(node: onnx.NodeProto, name: str, default: int) -> int:
    """The integer attribute `name` of `node`, or `default` when it is absent."""
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def ints_attr(node: onnx.NodeProto, name: str, default: list[int]) -> list[int]:
    """The integer-list attribute `name` of `node`, or `default` when it is absent."""
    for attr in node.attribute:
        if attr.name == name:
            return [int(v) for v in attr.ints]
    return default


def node_readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Each value name -> the nodes of `graph` that read it, in graph order (a node reading
    a value twice is listed twice)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def inferred_shapes(model: onnx.ModelProto) -> dict[str, onnx.TensorShapeProto]:
    """The shape of each graph input, output and intermediate value after ONNX shape
    inference; empty when shapes cannot be inferred (e.g. a model of 2 GB or more)."""
    try:
        graph = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # onnx raises its own classes; no shapes means no shape-based rule
        return {}
    return {v.name: v.type.tensor_type.shape
            for v in (*graph.input, *graph.value_info, *graph.output)}


def with_weights(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` whose initializers named in `arrays` hold those values (cast to
    the initializer's own type); every name must be an initializer.

    The copy is assembled field by field, never copied whole and then overwritten: a
    protobuf message keeps every byte once copied into it until the whole message is
    freed, so overwriting would keep the old weights' bytes alive as long as the copy
    (whisper-tiny.en's smoothed weights: 52 MiB; BENCHMARKS.md, issue 13). Serialized, the
    result is the same bytes as a whole copy with those initializers replaced."""
    inits = {t.name: t for t in model.graph.initializer}
    missing = sorted(set(arrays) - set(inits))
    if missing:
        raise SfcError(f"not initializers of the graph: {', '.join(missing[:5])}")
    new = {}
    for name, array in arrays.items():
        init = inits[name]
        value = np.asarray(array).astype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type))
        if tuple(value.shape) != tuple(init.dims):
            raise SfcError(f"weight '{name}': replacement shape {value.shape} is not "
                           f"{tuple(init.dims)}")
        new[name] = numpy_helper.from_array(value, name)
    copy = onnx.ModelProto()
    if unknown_fields.UnknownFieldSet(model) or unknown_fields.UnknownFieldSet(model.graph):
        # Fields this onnx does not know (a newer writer's) survive only a whole copy,
        # which then keeps the replaced weights' old bytes too.
        copy.CopyFrom(model)
        for init in copy.graph.initializer:
            if init.name in new:
                init.CopyFrom(new[init.name])
        return copy
    _copy_fields(model, copy, skip="graph")
    _copy_fields(model.graph, copy.graph, skip="initializer")
    copy.graph.initializer.extend(new.get(t.name, t) for t in model.graph.initializer)
    return copy


def _copy_fields(source: Any, target: Any, skip: str) -> None:
    """Every set field of protobuf message `source` but `skip` into `target`."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if isinstance(value, Message):
            getattr(target, field.name).CopyFrom(value)
        elif isinstance(value, (bool, int, float, str, bytes)):
            setattr(target, field.name, value)
        else:  # a repeated field
            getattr(target, field.name).extend(value)
