"""TensorRT-ready QDQ: sub-4-bit weight layers become sfc's W2A16 plugin node.

TensorRT has no INT2 data type (../shared/guide/tensorrt.md), so a MatMul whose weight is
an INT2 block-quantized DequantizeLinear cannot be parsed. This pass replaces each
`DQ(INT2 weight, scales) -> MatMul(x, .)` pair by one node

    W2A16MatMul(x, packed: uint8[ceil(K*N/4)], scales: [ceil(K/block), N])
    attributes: K, N, block_size, plugin_namespace="sfc", plugin_version="1"

whose op_type is the plugin name and whose `plugin_namespace` attribute lets TensorRT's
ONNX parser find the `sfc::W2A16MatMul` plugin (`sfc.kernels.trt_plugin`). The packed
bytes are the INT2 initializer's own raw data (ONNX layout: x0 | x1<<2 | x2<<4 | x3<<6 over
the row-major [K, N] tensor), so nothing is requantized. The node's domain is
`ai.onnx.contrib`, where onnxruntime-extensions looks up Python custom ops: with
`sfc.kernels.ort_ops` registered, the same file runs in ONNX Runtime with the numpy
reference numerics (that is how CPU tests cover it).

x and y stay fp32 in the graph (ONNX Runtime's Python custom ops take no fp16); the kernel
rounds x to fp16 as it loads it and accumulates in fp32 (W2A16).

Numeric contract: y = fp16(x) @ (q * repeat(scales, block, axis=0)[:K]): the DQ + MatMul
with the activations rounded to fp16.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..onnx_utils import node_readers

__all__ = [
    "PLUGIN_DOMAIN",
    "PLUGIN_NAMESPACE",
    "PLUGIN_OP",
    "substitute_plugins",
]

PLUGIN_OP = "W2A16MatMul"
PLUGIN_NAMESPACE = "sfc"
PLUGIN_DOMAIN = "ai.onnx.contrib"  # onnxruntime-extensions' custom-op domain
_TRT_OPSET, _TRT_IR = 21, 10  # what the file needs once no INT2 tensor is left


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def substitute_plugins(model: onnx.ModelProto) -> int:
    """Replace INT2 block-weight DQ -> MatMul pairs by plugin nodes, in place.

    Returns how many layers were substituted. When no INT2 tensor remains, the default
    opset drops to 21 / IR 10 (what TensorRT's parser and ONNX Runtime take for INT4).
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    readers = node_readers(graph)
    replaced: dict[int, list[onnx.NodeProto]] = {}  # index of the MatMul -> its replacement
    dropped: set[int] = set()
    index = {id(n): k for k, n in enumerate(graph.node)}
    new_inits: list[TensorProto] = []
    for k, node in enumerate(graph.node):
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        dq = producers.get(node.input[1])
        if (dq is None or dq.op_type != "DequantizeLinear"
                or len(readers.get(dq.output[0], [])) != 1):
            continue
        weight = inits.get(dq.input[0])
        if weight is None or weight.data_type != TensorProto.INT2 or len(weight.dims) != 2:
            continue
        if _attr(dq, "axis", 1) != 0 or not _attr(dq, "block_size", 0):
            continue  # only the block-along-K layout the QDQ writer emits
        kdim, ndim = (int(d) for d in weight.dims)
        packed_name = f"{weight.name}_packed"
        packed = _pack2(numpy_helper.to_array(weight).astype(np.int8).ravel())
        new_inits.append(numpy_helper.from_array(packed, packed_name))
        replaced[k] = [helper.make_node(
            PLUGIN_OP, [node.input[0], packed_name, dq.input[1]], list(node.output),
            name=node.name or f"{PLUGIN_OP}_{k}", domain=PLUGIN_DOMAIN, K=kdim, N=ndim,
            block_size=_attr(dq, "block_size", 0), plugin_namespace=PLUGIN_NAMESPACE,
            plugin_version="1")]
        dropped.add(index[id(dq)])
    if not replaced:
        return 0
    nodes = [m for k, n in enumerate(graph.node) if k not in dropped
             for m in replaced.get(k, [n])]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep + new_inits)
    if not any(i.data_type in (TensorProto.INT2, TensorProto.UINT2) for i in graph.initializer):
        for opset in model.opset_import:
            if opset.domain in ("", "ai.onnx") and opset.version > _TRT_OPSET:
                opset.version = _TRT_OPSET
                model.ir_version = _TRT_IR
    if not any(o.domain == PLUGIN_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(PLUGIN_DOMAIN, 1))
    return len(replaced)


def _pack2(values: np.ndarray) -> np.ndarray:
    """INT2 values in the ONNX layout as uint8 (x0 | x1<<2 | x2<<4 | x3<<6)."""
    from ..kernels.packing import pack_int2

    return pack_int2(values)
