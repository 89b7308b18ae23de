"""Small ONNX helpers shared by passes."""

from __future__ import annotations

import onnx

__all__ = ["int_attr"]


def int_attr(node: onnx.NodeProto, name: str, default: int) -> int:
    """The integer attribute `name` of `node`, or `default` when it is absent."""
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default
