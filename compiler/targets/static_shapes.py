"""Shape arithmetic that symbolic shape inference can name, written as constants.

Transformers' Whisper export computes each attention Reshape's target at run time: Shape ->
Gather -> Unsqueeze -> Concat of the input's batch and token counts and the head sizes
([batch, tokens, 384] -> [batch, tokens, 6, 64] and back), and reads the static head size
the same way for the attention scale (Shape -> Gather -> Cast -> Pow). ONNX Runtime folds
none of it, because the shapes hold symbolic dimensions, so a decoder step runs about a
hundred small shape ops for 24 Reshapes (tiny.en). ONNX Runtime's symbolic shape inference
(`onnxruntime.tools.symbolic_shape_infer`) names every dimension; with those names:

- a Reshape whose output dimension i is a number gets that number; where it is the input's
  dimension at the same position i (the same symbol) it gets 0, which Reshape copies from
  its input (not with `allowzero`); one dimension left unnamed gets -1;
- a Gather of static dimensions from a Shape becomes a constant, so ORT folds what follows.

The graph computes the same values bit for bit: only where its shapes come from changes. The
shape ops nothing reads any more are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..onnx_utils import constant_value, drop_unread, int_attr, node_readers

__all__ = ["StaticShapes", "symbolic_shapes"]

Dims = list[int | str | None]

# Initializers larger than this stay out of the copy shape inference sees (as graph inputs
# of their shape): only small ones (indices, shape constants) can take part in a shape.
_SMALL_ELEMENTS = 64
_SHAPE_OPS = frozenset({"Shape", "Gather", "Unsqueeze", "Concat", "Squeeze", "Cast", "Slice",
                        "Constant"})


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model`'s graph with its large initializers as typed graph inputs instead (so shape
    inference neither copies nor reads weights)."""
    graph = model.graph
    small: list[onnx.TensorProto] = []
    large: list[onnx.TensorProto] = []
    for t in graph.initializer:
        (small if int(np.prod(t.dims)) <= _SMALL_ELEMENTS else large).append(t)
    inputs = [*graph.input, *(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                              for t in large)]
    skeleton = helper.make_graph(list(graph.node), graph.name, inputs, list(graph.output),
                                 small)
    return helper.make_model(skeleton, opset_imports=list(model.opset_import),
                             ir_version=model.ir_version)


def symbolic_shapes(model: onnx.ModelProto) -> dict[str, Dims]:
    """Each value's dimensions (a number, a symbol's name, or None) after ONNX Runtime's
    symbolic shape inference; empty when it cannot run on `model` (an op it does not know,
    a shape it cannot merge)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        inferred = SymbolicShapeInference.infer_shapes(_skeleton(model))
    except Exception:  # its own asserts and KeyErrors: no names means no rewrite
        return {}
    if inferred is None:
        return {}
    shapes: dict[str, Dims] = {}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        if not value.type.tensor_type.HasField("shape"):
            continue
        shapes[value.name] = [d.dim_value if d.HasField("dim_value")
                              else (d.dim_param or None)
                              for d in value.type.tensor_type.shape.dim]
    return shapes


def reshape_target(source: Dims, target: Dims, allow_zero: bool) -> list[int] | None:
    """A constant Reshape target giving `target` from `source`, or None if the names do not
    pin one down (more than one dimension neither a number nor copied from its position)."""
    out: list[int] = []
    unnamed = 0
    for i, dim in enumerate(target):
        if isinstance(dim, int):
            out.append(dim)
        elif (not allow_zero and dim is not None and i < len(source)
              and source[i] == dim):
            out.append(0)
        else:
            out.append(-1)
            unnamed += 1
    return out if unnamed <= 1 else None


@dataclass(frozen=True)
class StaticShapes:
    """Computed Reshape targets and static shape reads  ==>  constants (module docstring)."""

    name: str = "static-shapes"

    def apply(self, model: onnx.ModelProto) -> int:
        """Rewrite in place; return how many Reshape targets and Gathers became constants."""
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        producer = {o: n for n in graph.node for o in n.output}

        def computed(name: str) -> bool:
            return constant_value(name, inits, producer) is None and name in producer

        outputs = {o.name for o in graph.output}
        candidates = [n for n in graph.node if n.domain in ("", "ai.onnx") and (
            (n.op_type == "Reshape" and computed(n.input[1]))
            or (n.op_type == "Gather" and n.input[0] in producer
                and producer[n.input[0]].op_type == "Shape" and n.output[0] not in outputs))]
        if not candidates:
            return 0
        shapes = symbolic_shapes(model)
        if not shapes:
            return 0
        readers = node_readers(graph)
        fired = 0
        for node in candidates:
            base = node.name or node.output[0]
            if node.op_type == "Reshape":
                source, target = shapes.get(node.input[0]), shapes.get(node.output[0])
                if source is None or target is None:
                    continue
                dims = reshape_target(source, target, bool(int_attr(node, "allowzero", 0)))
                if dims is None:
                    continue
                name = f"{base}_static_shape"
                graph.initializer.append(numpy_helper.from_array(np.array(dims, np.int64), name))
                node.input[1] = name
            else:
                picked = self._static_dims(node, shapes, inits, producer)
                if picked is None:
                    continue
                name = f"{base}_static_dims"
                graph.initializer.append(numpy_helper.from_array(picked, name))
                for reader in readers.get(node.output[0], []):
                    reader.input[:] = [name if i == node.output[0] else i for i in reader.input]
            fired += 1
        if fired:
            drop_unread(graph, [n for n in list(graph.node) if n.op_type in _SHAPE_OPS])
        return fired

    @staticmethod
    def _static_dims(gather: onnx.NodeProto, shapes: dict[str, Dims],
                     inits: dict[str, onnx.TensorProto],
                     producer: dict[str, onnx.NodeProto]) -> np.ndarray | None:
        """The value of Gather(Shape(x), constant indices) where those dimensions of x are
        numbers, with the Gather's output shape; None otherwise."""
        shape_node = producer[gather.input[0]]
        dims = shapes.get(shape_node.input[0])
        index = constant_value(gather.input[1], inits, producer)
        if dims is None or index is None or int_attr(gather, "axis", 0) != 0:
            return None
        start = int_attr(shape_node, "start", 0)
        end = int_attr(shape_node, "end", len(dims))
        read = dims[slice(start, end)]
        picked = []
        for i in index.reshape(-1):
            i = int(i)
            if not -len(read) <= i < len(read) or not isinstance(read[i], int):
                return None
            picked.append(read[i])
        return np.array(picked, np.int64).reshape(index.shape)
