"""Small ONNX helpers shared by passes."""

from __future__ import annotations

import onnx

__all__ = ["inferred_shapes", "int_attr", "ints_attr"]


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


def inferred_shapes(model: onnx.ModelProto) -> dict[str, onnx.TensorShapeProto]:
    """The shape of each graph input, output and intermediate value after ONNX shape
    inference; empty when shapes cannot be inferred (e.g. a model of 2 GB or more)."""
    try:
        graph = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # onnx raises its own classes; no shapes means no shape-based rule
        return {}
    return {v.name: v.type.tensor_type.shape
            for v in (*graph.input, *graph.value_info, *graph.output)}
