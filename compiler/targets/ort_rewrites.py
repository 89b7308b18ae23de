"""Graph rewrites the ort-cpu target applies before ORT's optimizer, for patterns ORT
leaves slow.

`GatherOfDequantized`: a DequantizeLinear of a whole constant table read by a Gather (a
quantized token-embedding table tied to the output projection) is not constant-folded by
ORT, so every decoder step dequantizes all of it (~30 ms per step for Whisper's
51864 x 384 table, against 5 ms for the whole FP32 step). Rewritten as
`Gather(int8 table) -> Cast -> Mul(Gather(scales))`, only the looked-up rows are
dequantized. Numeric contract: for an INT8 table whose scales are per gathered slice
(per-channel along the gather axis, or blocks along the other axis that divide it
exactly: `Gather(int8) -> Cast -> Reshape into blocks -> Mul(gathered block scales) ->
Reshape back`) the result equals the DQ -> Gather exactly; other layouts (INT4/INT2
blocks, per-tensor) are first re-expressed as INT8 per-channel along the gather axis
(absmax), since ORT's Gather has no 4/2-bit kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..onnx_utils import int_attr

__all__ = ["GatherOfDequantized", "apply_rewrites"]


@dataclass(frozen=True)
class GatherOfDequantized:
    """DQ(const table) -> Gather  ==>  Gather(int8 table) -> Cast -> Mul(gathered scales)."""

    name: str = "gather-of-dequantized"

    def apply(self, model: onnx.ModelProto) -> int:
        """Rewrite every match in the main graph in place; return how many fired."""
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                readers.setdefault(name, []).append(node)
        fired = 0
        for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
            users = readers.get(dq.output[0], [])
            if len(users) != 1 or users[0].op_type != "Gather" or users[0].input[0] != dq.output[0]:
                continue
            if dq.input[0] not in inits or dq.input[1] not in inits:
                continue
            if len(dq.input) > 2 and dq.input[2]:
                zp = numpy_helper.to_array(inits[dq.input[2]])
                if np.any(zp != 0):
                    continue  # zero-point blocks: ORT runs the DQ, then the Gather
            table = numpy_helper.to_array(inits[dq.input[0]])
            if table.ndim != 2:
                continue
            self._rewrite(graph, dq, users[0], table, numpy_helper.to_array(inits[dq.input[1]]))
            fired += 1
        return fired

    def _rewrite(self, graph: onnx.GraphProto, dq: onnx.NodeProto, gather: onnx.NodeProto,
                 table: np.ndarray, scale: np.ndarray) -> None:
        axis = int_attr(gather, "axis", 0) % 2
        dq_axis = int_attr(dq, "axis", 1) % 2
        block = int_attr(dq, "block_size", 0)
        exact = table.dtype == np.int8 and scale.dtype == np.float32 and (
            (scale.ndim == 1 and dq_axis == axis and not block)
            or (block and dq_axis != axis and table.shape[dq_axis] % block == 0))
        base = gather.name or gather.output[0]
        names = {k: f"{base}_{k}" for k in (
            "table_i8", "scales", "rows_i8", "row_scales", "rows_f32", "row_scales_b", "axes",
            "rows_blocked", "scales_blocked", "blocked_shape", "scales_shape", "scaled",
            "rows_shape")}
        if exact:
            # The table and its scales are used as they are (often shared with a MatMul).
            names["table_i8"], names["scales"] = dq.input[0], dq.input[1]
        else:
            block = 0
            floats = _dequantize(table, scale, dq_axis, int_attr(dq, "block_size", 0))
            absmax = np.abs(floats).max(axis=1 - axis)
            scales = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
            shaped = scales[None, :] if axis == 1 else scales[:, None]
            ints = np.clip(np.rint(floats / shaped), -127, 127).astype(np.int8)
            graph.initializer.extend([numpy_helper.from_array(ints, names["table_i8"]),
                                      numpy_helper.from_array(scales, names["scales"])])
        idx = gather.input[1]
        new = [
            helper.make_node("Gather", [names["table_i8"], idx], [names["rows_i8"]], axis=axis,
                             name=f"{base}_gather_i8"),
            helper.make_node("Gather", [names["scales"], idx], [names["row_scales"]],
                             axis=axis if block else 0, name=f"{base}_gather_scales"),
            helper.make_node("Cast", [names["rows_i8"]], [names["rows_f32"]],
                             to=onnx.TensorProto.FLOAT, name=f"{base}_cast"),
        ]
        if block:
            new += _blockwise_mul(names, base, graph, table.shape[dq_axis] // block, block,
                                  axis, gather.output[0])
        else:
            row_scales = names["row_scales"]
            if axis == 0:  # rows [*idx, D] times scales [*idx] -> scales need a trailing axis
                graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64),
                                                                 names["axes"]))
                new.append(helper.make_node("Unsqueeze", [row_scales, names["axes"]],
                                            [names["row_scales_b"]], name=f"{base}_unsqueeze"))
                row_scales = names["row_scales_b"]
            new.append(helper.make_node("Mul", [names["rows_f32"], row_scales],
                                        [gather.output[0]], name=f"{base}_dequantize_rows"))
        nodes = list(graph.node)
        at = nodes.index(gather)
        nodes[at : at + 1] = new
        nodes.remove(dq)
        del graph.node[:]
        graph.node.extend(nodes)


def _blockwise_mul(names: dict[str, str], base: str, graph: onnx.GraphProto, blocks: int,
                   block: int, axis: int, output: str) -> list[onnx.NodeProto]:
    """Gathered float rows times their gathered block scales, exactly as DQ computes them:
    rows [K, *idx] (gather axis 1) or [*idx, K] (axis 0) are viewed as blocks of `block`
    along K, multiplied by scales [blocks, *idx] or [*idx, blocks], and reshaped back."""
    if axis == 1:
        rows_view, scales_view = [blocks, block, -1], [blocks, 1, -1]
    else:
        rows_view, scales_view = [-1, blocks, block], [-1, blocks, 1]
    graph.initializer.extend([
        numpy_helper.from_array(np.array(rows_view, np.int64), names["blocked_shape"]),
        numpy_helper.from_array(np.array(scales_view, np.int64), names["scales_shape"])])
    node = helper.make_node
    return [
        node("Reshape", [names["rows_f32"], names["blocked_shape"]], [names["rows_blocked"]],
             name=f"{base}_blocks"),
        node("Reshape", [names["row_scales"], names["scales_shape"]], [names["scales_blocked"]],
             name=f"{base}_block_scales"),
        node("Mul", [names["rows_blocked"], names["scales_blocked"]], [names["scaled"]],
             name=f"{base}_dequantize_blocks"),
        node("Shape", [names["rows_i8"]], [names["rows_shape"]], name=f"{base}_shape"),
        node("Reshape", [names["scaled"], names["rows_shape"]], [output],
             name=f"{base}_unblock"),
    ]


def _dequantize(q: np.ndarray, scale: np.ndarray, axis: int, block: int) -> np.ndarray:
    """DequantizeLinear of a 2-D constant (zero point 0): per-tensor, per-axis or blocked."""
    x = q.astype(np.float32)
    if scale.ndim == 0:
        return x * scale
    if block:
        return x * np.repeat(scale, block, axis=axis)[: q.shape[0], : q.shape[1]]
    return x * (scale[None, :] if axis == 1 else scale[:, None])


def apply_rewrites(model: onnx.ModelProto) -> dict[str, int]:
    """Apply every ort-cpu rewrite in place; return rule name -> times fired."""
    rules = (GatherOfDequantized(),)
    return {r.name: r.apply(model) for r in rules}
