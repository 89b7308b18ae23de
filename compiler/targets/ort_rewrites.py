"""Graph rewrites the ort-cpu target applies before ORT's optimizer, for patterns ORT
leaves slow.

`ConvAsMatMul`: ORT fuses a QDQ Conv into `QLinearConv` only when a QuantizeLinear follows
it, so a quantized 1-D Conv whose output stays float (Whisper's two encoder convs, followed
by GELU) runs as DequantizeLinear + float Conv. Rewritten as an im2col of the dequantized
input (Transpose, Pad with 0, Reshape, Slices interleaved by Unsqueeze, Concat and Reshape:
data movement only) -> QuantizeLinear and DequantizeLinear with the input's own scale and
zero point -> MatMul with the weight as a per-column INT8 [C*k, M] matrix -> Add bias ->
Transpose back, which ORT fuses into `MatMulIntegerToFloat`. Exact: requantizing a
dequantized value (or the padding's 0) with the same scale gives back the same integer, so
the GEMM sees the QDQ graph's integers and scales; only the float summation order differs.
(The im2col runs on floats rather than on the integers because ORT moves x86 activations
from s8 to u8 only across a Q -> DQ pair.)

`AttentionAsMultiHead`: ORT's CPU optimizer leaves the exported float attention core as
MatMul -> Softmax -> MatMul over a materialised [H, T, T] score tensor (Whisper's 1500-frame
encoder: a third of the W8A8 encoder's kernel time in MatMul, a fifth in Softmax); its
contrib `MultiHeadAttention` computes the same core tiled.

`GeluChannelScale`: activation smoothing (`quant.smooth`) folds fc2's per-channel input
scale into the Mul by 0.5 that ends the exported GELU, making it a vector; ORT's GELU
fusion wants the scalar 0.5, so every fc1 GELU ran as five element-wise ops (Div, Erf, Add,
Mul, Mul) after the bias Add, instead of one `BiasGelu`. Rewritten as the GELU with its 0.5
and then a Mul by the vector times 2: the same products scaled by powers of two, so the
graph computes what it did up to the rounding of ORT's fused kernel (its erf argument is
x * (1/sqrt 2) where the graph divides by sqrt 2): on random inputs a tenth of its outputs
differ, by at most 2.4e-7, and on the default W8A8 builds 37-58 of 350 transcripts changed,
in both directions (lossless on 3 seeds x 2 sets of both zoo models; BENCHMARKS.md,
issue 13).

`fuse_integer_matmul_bias` runs on ORT's optimized graph instead: ORT turns a QDQ MatMul
whose output stays float into `MatMulIntegerToFloat` but leaves the bias Add after it (18 of
the W8A8 tiny.en encoder's 32, each a pass over a [1500, 384 or 1536] tensor, and one more
op per decoder step), although the op takes a bias input.

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

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..onnx_utils import inferred_shapes, int_attr, ints_attr, node_readers

__all__ = ["AttentionAsMultiHead", "ConvAsMatMul", "GatherOfDequantized", "GeluChannelScale",
           "apply_rewrites", "fuse_integer_matmul_bias"]


@dataclass(frozen=True)
class GatherOfDequantized:
    """DQ(const table) -> Gather  ==>  Gather(int8 table) -> Cast -> Mul(gathered scales)."""

    name: str = "gather-of-dequantized"

    def apply(self, model: onnx.ModelProto) -> int:
        """Rewrite every match in the main graph in place; return how many fired."""
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        readers = node_readers(graph)
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


@dataclass(frozen=True)
class ConvAsMatMul:
    """DQ(x) -> Conv1d(DQ(W))  ==>  im2col(DQ(x)) -> Q -> DQ -> MatMul(DQ(W as [C*k, M])).

    Fires on 1-D Convs (input [N, C, T] of rank 3 after shape inference; T may be symbolic,
    as in an encoder exported for `--encoder-window fit`; group 1, dilation 1, constant
    pads) whose input is a per-tensor DequantizeLinear and whose weight is a
    per-output-channel INT8 DequantizeLinear of a constant. The window of output t is
    x[s*t + j - pad] for j < k: tap j is the slice of the padded input [N, P, C] from j to
    P - (k - 1 - j) in steps of s, which holds floor((P - k) / s) + 1 rows, the Conv's
    output length, for any P; so the graph needs no frame count. The taps are interleaved
    so that the GEMM's K index is c*k + j, the order in which the weight quantizer flattens
    [M, C, k] and limits K-adjacent pairs for ort-cpu:avx2 (that CPU's INT8 GEMM adds them
    in int16); a Conv whose weight still has a pair over `pair_limit` (a QDQ file from
    elsewhere) is left as it is.
    """

    name: str = "conv-as-matmul"
    pair_limit: int | None = None

    def apply(self, model: onnx.ModelProto) -> int:
        """Rewrite every match in the main graph in place; return how many fired."""
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        producer = {o: n for n in graph.node for o in n.output}
        shapes: dict[str, onnx.TensorShapeProto] | None = None
        fired = 0
        for conv in [n for n in graph.node if n.op_type == "Conv" and n.domain in ("", "ai.onnx")]:
            x_dq, w_dq = producer.get(conv.input[0]), producer.get(conv.input[1])
            if (x_dq is None or w_dq is None or not (_is_dq(x_dq) and _is_dq(w_dq))
                    or w_dq.input[0] not in inits):
                continue
            x_scale = inits.get(x_dq.input[1])
            w_q = numpy_helper.to_array(inits[w_dq.input[0]])
            w_scale = inits.get(w_dq.input[1])
            if (x_scale is None or numpy_helper.to_array(x_scale).size != 1
                    or w_scale is None or w_q.dtype != np.int8 or w_q.ndim != 3
                    or int_attr(w_dq, "axis", 1) != 0 or _has_zero_point(w_dq, inits)
                    or numpy_helper.to_array(w_scale).shape != (w_q.shape[0],)):
                continue
            if int_attr(conv, "group", 1) != 1 or any(d != 1 for d in ints_attr(
                    conv, "dilations", [1])) or _attr_str(conv, "auto_pad") not in ("", "NOTSET"):
                continue
            if shapes is None:
                shapes = inferred_shapes(model)
            dims = _fixed_dims(shapes.get(x_dq.input[0]))
            if dims is None or len(dims) != 3 or dims[1] not in (None, w_q.shape[1]):
                continue
            columns = _im2col_weight(w_q)
            if self.pair_limit is not None and _pairs_exceed(columns, self.pair_limit):
                continue
            self._rewrite(graph, conv, x_dq, w_dq, columns, w_q.shape[1])
            fired += 1
        if fired:
            _drop_unread(graph, (n for n in list(graph.node) if _is_dq(n)))
        return fired

    def _rewrite(self, graph: onnx.GraphProto, conv: onnx.NodeProto, x_dq: onnx.NodeProto,
                 w_dq: onnx.NodeProto, columns: np.ndarray, channels: int) -> None:
        taps = columns.shape[0] // channels
        stride = ints_attr(conv, "strides", [1])[0]
        left, right = ints_attr(conv, "pads", [0, 0])
        base = conv.name or conv.output[0]
        node = helper.make_node

        def const(tag: str, values: list[int]) -> str:
            graph.initializer.append(
                numpy_helper.from_array(np.array(values, np.int64), f"{base}_const_{tag}"))
            return f"{base}_const_{tag}"

        new = [node("Transpose", [x_dq.output[0]], [f"{base}_xt"], perm=[0, 2, 1],
                    name=f"{base}_xt")]
        padded = f"{base}_xt"
        if left or right:
            pads = const("pads", [0, left, 0, 0, right, 0])
            new.append(node("Pad", [padded, pads], [f"{base}_padded"], name=f"{base}_pad"))
            padded = f"{base}_padded"
        axis, step, last = const("time_axis", [1]), const("step", [stride]), const("last_axis", [3])
        parts = []
        for j in range(taps):
            # Counted from the end, so that the slice fits any frame count.
            end = -(taps - 1 - j) if j < taps - 1 else np.iinfo(np.int64).max
            new.append(node("Slice", [padded, const(f"tap{j}_start", [j]),
                                      const(f"tap{j}_end", [end]), axis, step],
                            [f"{base}_tap{j}"], name=f"{base}_tap{j}"))
            parts.append(f"{base}_tap{j}_last")
            new.append(node("Unsqueeze", [f"{base}_tap{j}", last], [parts[-1]],
                            name=f"{base}_tap{j}_last"))
        new.append(node("Concat", parts, [f"{base}_windows"], axis=3, name=f"{base}_windows"))
        new.append(node("Reshape", [f"{base}_windows",
                                    const("cols_shape", [0, 0, channels * taps])],
                        [f"{base}_cols_float"], name=f"{base}_im2col"))
        new.append(node("QuantizeLinear", [f"{base}_cols_float", *x_dq.input[1:]],
                        [f"{base}_cols_quantized"], name=f"{base}_cols_quantize"))
        new.append(node("DequantizeLinear", [f"{base}_cols_quantized", *x_dq.input[1:]],
                        [f"{base}_cols"], name=f"{base}_cols_dequantize"))
        graph.initializer.append(numpy_helper.from_array(columns, f"{base}_weight_columns"))
        new.append(node("DequantizeLinear", [f"{base}_weight_columns", w_dq.input[1]],
                        [f"{base}_weight"], axis=1, name=f"{base}_weight_dequantize"))
        product = f"{base}_product"
        new.append(node("MatMul", [f"{base}_cols", f"{base}_weight"], [product],
                        name=f"{base}_matmul"))
        if len(conv.input) > 2 and conv.input[2]:
            new.append(node("Add", [product, conv.input[2]], [f"{base}_biased"],
                            name=f"{base}_bias"))
            product = f"{base}_biased"
        new.append(node("Transpose", [product], [conv.output[0]], perm=[0, 2, 1],
                        name=f"{base}_out"))
        nodes = list(graph.node)
        at = nodes.index(conv)
        nodes[at : at + 1] = new
        del graph.node[:]
        graph.node.extend(nodes)


@dataclass(frozen=True)
class AttentionAsMultiHead:
    """Float attention core ==> `com.microsoft.MultiHeadAttention` (one op, no [T, T] tensor).

    The matched core, as PyTorch's exporter writes a transformer's eager attention with the
    query already scaled (Whisper's `q_proj(x) * head_dim**-0.5`):
    `Reshape(q, [B, T, H, d]) -> Transpose(0, 2, 1, 3)`, the same for k with
    `Transpose(0, 2, 3, 1)` and for v with `Transpose(0, 2, 1, 3)`; `MatMul(q, k) ->
    Softmax(last axis) -> MatMul(., v) -> Transpose(0, 2, 1, 3) -> Reshape(3-D)`. With no
    mask, no bias and no Q/DQ inside, it is exactly `MultiHeadAttention(q, k, v)` with
    `num_heads` H and `scale` 1 (the query carries the scale), which ORT's CPU kernel runs
    tiled (softmax fused, the [H, T, T] scores never stored whole). Not bit-exact: the
    softmax sums in another order. An attention whose matmuls take Q/DQ
    (`--quantize-attention`) does not match, and stays as ORT fuses it.
    """

    name: str = "attention-as-multihead"

    def apply(self, model: onnx.ModelProto) -> int:
        """Rewrite every match in the main graph in place; return how many fired."""
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        producer = {o: n for n in graph.node for o in n.output}
        readers = node_readers(graph)
        outputs = {o.name for o in graph.output}

        def only(name: str, op: str) -> onnx.NodeProto | None:
            """The single reader of `name` if it is an `op` (and `name` is no graph output)."""
            users = readers.get(name, [])
            if name in outputs or len(users) != 1 or users[0].op_type != op:
                return None
            return users[0]

        def split_heads(name: str, perm: list[int]) -> tuple[onnx.NodeProto, ...] | None:
            """Transpose(perm) <- Reshape(x, [.., .., .., d]), both read once: (T, R)."""
            transpose = producer.get(name)
            if (transpose is None or transpose.op_type != "Transpose"
                    or ints_attr(transpose, "perm", []) != perm
                    or only(transpose.output[0], "MatMul") is None):
                return None
            reshape = producer.get(transpose.input[0])
            if reshape is None or reshape.op_type != "Reshape" or only(
                    reshape.output[0], "Transpose") is None:
                return None
            return transpose, reshape

        shapes: dict[str, onnx.TensorShapeProto] | None = None
        replaced: dict[str, onnx.NodeProto] = {}  # the output Reshape's output -> MHA
        removed: set[str] = set()  # first outputs of the matched cores' nodes
        for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
            scores = producer.get(softmax.input[0])
            scaled: list[onnx.NodeProto] = []
            scale = 1.0
            if scores is not None and scores.op_type == "Mul":  # scores * a scalar constant
                factor = _constant(scores.input[1], inits, producer)
                if factor is None or factor.size != 1 or only(scores.output[0], "Softmax") is None:
                    continue
                scaled, scale = [scores], float(factor.reshape(-1)[0])
                scores = producer.get(scores.input[0])
            if (scores is None or scores.op_type != "MatMul"
                    or int_attr(softmax, "axis", -1) not in (-1, 3)
                    or only(scores.output[0], scaled[0].op_type if scaled else "Softmax") is None):
                continue
            mix = only(softmax.output[0], "MatMul")
            if mix is None or mix.input[0] != softmax.output[0]:
                continue
            q = split_heads(scores.input[0], [0, 2, 1, 3])
            k = split_heads(scores.input[1], [0, 2, 3, 1])
            v = split_heads(mix.input[1], [0, 2, 1, 3])
            merge = only(mix.output[0], "Transpose")
            if q is None or k is None or v is None or merge is None or ints_attr(
                    merge, "perm", []) != [0, 2, 1, 3]:
                continue
            out = only(merge.output[0], "Reshape")
            if out is None or len(_shape_values(out.input[1], inits, producer) or ()) != 3:
                continue
            head_dims = {(_shape_values(r.input[1], inits, producer) or [None])[-1]
                         for _, r in (q, k, v)}
            if shapes is None:
                shapes = inferred_shapes(model)
            widths = {(_fixed_dims(shapes.get(r.input[0])) or [None])[-1] for _, r in (q, k, v)}
            if len(head_dims) != 1 or len(widths) != 1:
                continue
            head_dim, width = head_dims.pop(), widths.pop()
            if not head_dim or not width or head_dim <= 0 or width % head_dim:
                continue
            attention = helper.make_node(
                "MultiHeadAttention", [q[1].input[0], k[1].input[0], v[1].input[0]],
                [out.output[0]], domain="com.microsoft", num_heads=width // head_dim,
                scale=scale, name=f"{softmax.name or softmax.output[0]}_multihead")
            replaced[out.output[0]] = attention
            removed.update(n.output[0] for n in (*q, *k, *v, scores, *scaled, softmax, mix, merge))
        if replaced:
            nodes = [replaced.get(n.output[0], n) for n in graph.node
                     if n.output[0] not in removed]
            del graph.node[:]
            graph.node.extend(nodes)
            _drop_unread(graph, [n for n in list(graph.node) if n.op_type in _SHAPE_OPS])
            if not any(o.domain == "com.microsoft" for o in model.opset_import):
                model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        return len(replaced)


@dataclass(frozen=True)
class GeluChannelScale:
    """x * (Erf(x / sqrt 2) + 1) * v, v a constant vector  ==>  (GELU with 0.5) * (2 v).

    Matches the exported GELU `Div(x, sqrt 2) -> Erf -> Add(1) -> Mul(x, .) -> Mul(., v)`
    (either operand order of the Adds and Muls) whose last constant has more than one
    element; the last Mul takes the scalar 0.5 and a new Mul by 2 v writes the old output,
    so everything reading it (fc2's QuantizeLinear) is unchanged."""

    name: str = "gelu-channel-scale"

    def apply(self, model: onnx.ModelProto) -> int:
        """Rewrite every match in the main graph in place; return how many fired."""
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        producer = {o: n for n in graph.node for o in n.output}
        readers = node_readers(graph)

        def split(node: onnx.NodeProto | None, op: str) -> tuple[str, np.ndarray] | None:
            """(the other input, the constant) of a two-input `op` with one constant input."""
            if node is None or node.op_type != op or node.domain not in ("", "ai.onnx"):
                return None
            for i in (1, 0):
                value = _constant(node.input[i], inits, producer)
                if value is not None:
                    return node.input[1 - i], value
            return None

        def scalar(value: np.ndarray, expected: float) -> bool:
            return value.size == 1 and bool(np.isclose(float(value.reshape(-1)[0]), expected,
                                                       rtol=1e-4))

        added: dict[str, list[onnx.NodeProto]] = {}  # a matched last Mul's output -> new
        for last in [n for n in graph.node if n.op_type == "Mul"]:
            tail = split(last, "Mul")
            if tail is None or tail[1].size < 2 or tail[1].dtype != np.float32:
                continue
            product = producer.get(tail[0])
            if product is None or product.op_type != "Mul" or len(readers[tail[0]]) != 1:
                continue
            for x, one_plus in ((product.input[0], product.input[1]),
                                (product.input[1], product.input[0])):
                plus = split(producer.get(one_plus), "Add")
                erf = producer.get(plus[0]) if plus and scalar(plus[1], 1.0) else None
                if erf is None or erf.op_type != "Erf" or len(readers[one_plus]) != 1:
                    continue
                div = producer.get(erf.input[0])
                root2 = None if div is None else _constant(div.input[1], inits, producer)
                if (div is None or div.op_type != "Div" or div.input[0] != x or root2 is None
                        or not scalar(root2, float(np.sqrt(2.0)))):
                    continue
                base = last.name or last.output[0]
                half, doubled = f"{base}_half", f"{base}_channel_scale"
                graph.initializer.extend([
                    numpy_helper.from_array(np.array(0.5, np.float32), half),
                    numpy_helper.from_array((tail[1] * np.float32(2)).astype(np.float32),
                                            doubled)])
                gelu = f"{base}_gelu"
                scaled = helper.make_node("Mul", [gelu, doubled], [last.output[0]],
                                          name=f"{base}_channels")
                last.input[1 if last.input[0] == tail[0] else 0] = half
                last.output[0] = gelu
                added[gelu] = [scaled]
                break
        if added:
            nodes = [m for n in graph.node for m in (n, *added.get(n.output[0], []))]
            del graph.node[:]
            graph.node.extend(nodes)
            _drop_unread(graph, [n for n in list(graph.node) if n.op_type == "Constant"])
        return len(added)


# com.microsoft.MatMulIntegerToFloat's inputs: A, B, a_scale, b_scale, a_zero_point,
# b_zero_point, bias.
_MATMUL_BIAS_INPUT = 6


def fuse_integer_matmul_bias(model: onnx.ModelProto) -> int:
    """`MatMulIntegerToFloat -> Add(bias)` ==> `MatMulIntegerToFloat(..., bias)`, in place, on
    a graph ORT has optimized; returns how many fired. The Add must be the op's only reader
    and its other input a float32 initializer of shape [N], N the constant B's last axis:
    what the op adds to each output row."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers = node_readers(graph)
    outputs = {o.name for o in graph.output}
    fused: set[str] = set()  # the removed Adds' outputs
    for node in graph.node:
        if (node.op_type != "MatMulIntegerToFloat" or node.domain != "com.microsoft"
                or len(node.input) > _MATMUL_BIAS_INPUT or node.input[1] not in inits
                or node.output[0] in outputs):
            continue
        users = readers.get(node.output[0], [])
        if len(users) != 1 or users[0].op_type != "Add" or users[0].domain not in ("", "ai.onnx"):
            continue
        add = users[0]
        bias_name = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        bias = inits.get(bias_name)
        columns = list(inits[node.input[1]].dims)[-1:]
        if bias is None or bias.data_type != onnx.TensorProto.FLOAT or list(
                bias.dims) != columns or bias_name == node.output[0]:
            continue
        node.input.extend([""] * (_MATMUL_BIAS_INPUT - len(node.input)) + [bias_name])
        node.output[0] = add.output[0]
        fused.add(add.output[0])
    if fused:
        kept = [n for n in graph.node if not (n.op_type == "Add" and n.output[0] in fused)]
        del graph.node[:]
        graph.node.extend(kept)
    return len(fused)


# The ops that compute a Reshape's target shape or a constant (dropped once unread).
_SHAPE_OPS = frozenset({"Shape", "Gather", "Unsqueeze", "Concat", "Slice", "Squeeze", "Cast",
                        "Constant"})


def _constant(name: str, inits: dict[str, onnx.TensorProto],
              producer: dict[str, onnx.NodeProto]) -> np.ndarray | None:
    """The value of an initializer or of a `Constant` node's tensor; None otherwise."""
    if name in inits:
        return numpy_helper.to_array(inits[name])
    node = producer.get(name)
    if node is not None and node.op_type == "Constant" and node.attribute and (
            node.attribute[0].name == "value"):
        return numpy_helper.to_array(node.attribute[0].t)
    return None


def _shape_values(name: str, inits: dict[str, onnx.TensorProto],
                  producer: dict[str, onnx.NodeProto]) -> list[int | None] | None:
    """The elements of a 1-D shape tensor: a constant, or a Concat of one-element parts (a
    constant's value, or None for a computed one); None if unknown."""
    whole = _constant(name, inits, producer)
    if whole is not None:
        return [int(v) for v in whole.reshape(-1)]
    node = producer.get(name)
    if node is None or node.op_type != "Concat":
        return None
    values: list[int | None] = []
    for part in node.input:
        array = _constant(part, inits, producer)
        if array is not None:
            values.extend(int(v) for v in array.reshape(-1))
        elif producer.get(part) is not None and producer[part].op_type == "Unsqueeze":
            values.append(None)  # a scalar made 1-D: one element, value known at run time
        else:
            return None
    return values


def _drop_unread(graph: onnx.GraphProto, candidates: Iterable[onnx.NodeProto]) -> None:
    """Remove the `candidates` whose outputs nothing reads any more (a rewritten Conv's
    DequantizeLinears, a chain of shape ops), and initializers left unread by them."""
    left = list(candidates)
    dead: list[onnx.NodeProto] = []
    while True:  # a chain dies from its end: repeat until nothing more is unread
        read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        now = [n for n in left if not any(o in read for o in n.output)]
        if not now:
            break
        for n in now:
            graph.node.remove(n)
            left.remove(n)
        dead.extend(now)
    freed = {i for n in dead for i in n.input} - read
    for t in [t for t in graph.initializer if t.name in freed]:
        graph.initializer.remove(t)


def _is_dq(node: onnx.NodeProto | None) -> bool:
    return node is not None and node.op_type == "DequantizeLinear" and node.domain in (
        "", "ai.onnx")


def _has_zero_point(dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    if len(dq.input) < 3 or not dq.input[2]:
        return False
    return dq.input[2] not in inits or bool(np.any(numpy_helper.to_array(inits[dq.input[2]])))


def _attr_str(node: onnx.NodeProto, name: str) -> str:
    for attr in node.attribute:
        if attr.name == name:
            return attr.s.decode()
    return ""


def _fixed_dims(shape: onnx.TensorShapeProto | None) -> list[int | None] | None:
    if shape is None or not shape.dim:
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]


def _im2col_weight(w_q: np.ndarray) -> np.ndarray:
    """Conv weight [M, C, k] as the MatMul weight [C*k, M]: row c*k + j is channel c, tap j."""
    return np.ascontiguousarray(w_q.reshape(w_q.shape[0], -1).T)


def _pairs_exceed(columns: np.ndarray, limit: int) -> bool:
    """Whether |w[2i]| + |w[2i+1]| along K (rows) exceeds `limit` anywhere."""
    mags = np.abs(columns.astype(np.int32))
    if mags.shape[0] % 2:
        mags = np.vstack([mags, np.zeros((1, mags.shape[1]), np.int32)])
    return bool(np.any(mags[0::2] + mags[1::2] > limit))


def apply_rewrites(model: onnx.ModelProto, pair_limit: int | None = None,
                   fused_attention: bool = False) -> dict[str, int]:
    """Apply the ort-cpu rewrites in place; return rule name -> times fired.
    `pair_limit`: the target's INT8 weight pair limit (`TargetCaps.int8_weight_pair_limit`);
    `fused_attention`: also `AttentionAsMultiHead` (opt-in: not bit-exact, and on
    whisper-base one seed's default build measured not lossless with it where the unfused
    lowering was; BENCHMARKS.md, issue 13)."""
    rules: tuple[GatherOfDequantized | ConvAsMatMul | GeluChannelScale
                 | AttentionAsMultiHead, ...] = (
        GatherOfDequantized(), ConvAsMatMul(pair_limit=pair_limit), GeluChannelScale())
    if fused_attention:
        rules += (AttentionAsMultiHead(),)
    return {r.name: r.apply(model) for r in rules}
