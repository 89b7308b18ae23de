"""Write a recipe into an FP32 graph as QuantizeLinear / DequantizeLinear nodes.

This is the only code in sfc that writes Q/DQ nodes, and its output is the contract
between quantization and lowering. What it writes:

- Weights: the float initializer is replaced by an integer initializer (INT8, INT4 or
  INT2; onnx packs 4-bit low nibble first and 2-bit as x0 | x1<<2 | x2<<4 | x3<<6) and
  a float32 scale, and every node that read it reads a DequantizeLinear of it instead
  (a Gather on a tied embedding included), so no float copy remains. Each reader gets
  its own DQ node. When a weight has several readers, those that are weight-only
  MatMuls (B = this weight, A not quantized: the MatMulNBits candidates) get private
  copies of the integers and scale, Gathers get a private INT8 copy when the recipe
  gives one (`TensorRecipe.gather_spec`, quantized from the float weights), and the
  other readers share one copy: ORT fuses DQ -> MatMul into MatMulNBits only when the
  DQ has one consumer and its integer initializer feeds that DQ alone (measured,
  onnxruntime 1.31). Weight zero points are omitted (ONNX: zero), which TensorRT's
  parser accepts as symmetric, except for zero-point block specs
  (`QuantSpec.zero_point`, targets with `TargetCaps.block_zero_point`): their DQ takes
  a zero-point initializer of the integers' type, one per block, which ONNX Runtime
  fuses into MatMulNBits (measured for INT4 and INT2, onnxruntime 1.32).
- Activations: Q -> DQ (INT8, scalar scale, explicit int8 zero point 0: the zero
  point's type is what makes Q produce int8) right after the producer, read only by
  the recipe's consumers. A tensor with several quantized consumers gets one Q -> DQ
  pair per consumer, each with its own (equal-valued) scale and zero-point
  initializers. Why: on x86 ORT fuses int8-activation MatMuls only after its QDQ
  s8->u8 rewrite, which takes a Q with exactly one DQ; a shared Q/DQ (or one Q with
  several DQs) therefore stays float, and pairs that share initializers are merged
  back into one by ORT's common-subexpression elimination. Same scale either way, so
  TensorRT sees the same numerics.
- Scales as inputs (`scales_as_inputs`, for calibration searches, never for a
  deployable): the activations named there take their scale from a float32 scalar
  graph input named `scale_input_name(tensor)`, one per tensor and shared by all its
  Q/DQ pairs, instead of scale initializers, so one prepared session evaluates any
  candidate scales by feeding them. ORT's QDQ fusions need constant scales, so such a
  session runs those quantizers as float fake-quantization (same rounding and clipping).
- Versions: the default-domain opset becomes max(model's, what the specs need): 13
  for per-axis INT8, 21 for INT4 / `block_size`, 25 for INT2. The FP32 graph is
  upgraded with onnx's version converter *before* any Q/DQ is inserted (it adapts ops
  whose signature changed, e.g. ReduceMean axes, Split sizes). `ir_version` is set
  explicitly to max(model's, the minimum for that opset): 10 for opset 21, 13 for 25
  (onnxruntime 1.31 rejects onnx 1.23's default IR 14).

Pure and deterministic: same model + recipe -> byte-identical `SerializeToString()`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter

from ..errors import SfcError, first_line
from ..kernels.packing import pack
from .plan import subgraph_reads
from .recipe import Recipe, TensorRecipe, model_sha256
from .spec import QuantSpec, min_opset
from .stored import STORED_METHODS, StoredWeights
from .weights import round_to_nearest, split_zero_points

__all__ = ["QdqNames", "qdq_names", "qdq_versions", "scale_input_name", "write_qdq"]

_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class QdqNames:
    """Names of everything written for one tensor (one naming rule for the whole writer)."""

    quantized: str  # integer tensor: the weight initializer, or Q's output
    scale: str
    zero_point: str
    dequantized: str  # DQ output
    q_node: str
    dq_node: str


def qdq_names(tensor: str, reader: int | None = None) -> QdqNames:
    """Names for `tensor`; `reader` numbers the per-reader copies when it has several.

    A weight's integer initializer is always f"{tensor}_quantized" (shared by all its
    readers); everything else is numbered per reader.
    """
    suffix = "" if reader is None else f"_{reader}"
    return QdqNames(
        quantized=f"{tensor}_quantized{suffix}",
        scale=f"{tensor}_scale{suffix}",
        zero_point=f"{tensor}_zero_point{suffix}",
        dequantized=f"{tensor}_dequantized{suffix}",
        q_node=f"{tensor}_QuantizeLinear{suffix}",
        dq_node=f"{tensor}_DequantizeLinear{suffix}",
    )


def scale_input_name(tensor: str) -> str:
    """The graph input that carries `tensor`'s activation scale (`scales_as_inputs` mode)."""
    return f"{tensor}_scale_input"


def _default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in _DEFAULT_DOMAINS:
            return int(entry.version)
    raise SfcError("model imports no default-domain (ai.onnx) opset")


def qdq_versions(model: onnx.ModelProto, recipe: Recipe) -> tuple[int, int]:
    """(default-domain opset, IR version) of the QDQ model `write_qdq` would write."""
    current = _default_opset(model)
    opset = max([current] + [min_opset(t.spec) for t in recipe.tensors])
    min_ir = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    return opset, max(int(model.ir_version), int(min_ir))


def _upgrade(model: onnx.ModelProto, opset: int, ir_version: int) -> onnx.ModelProto:
    """A copy of `model` at `opset` (converted while still FP32) and `ir_version`."""
    current = _default_opset(model)
    if current < opset:
        try:
            out = version_converter.convert_version(model, opset)
        except Exception as exc:  # the converter raises bare RuntimeErrors
            first = first_line(exc)
            what = f"cannot convert the model from opset {current} to {opset}"
            raise SfcError(f"{what}: {first}") from None
    else:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    out.ir_version = ir_version
    return out


def _dq_attrs(spec: QuantSpec) -> dict[str, Any]:
    if spec.granularity == "tensor":
        return {}
    assert spec.axis is not None
    if spec.granularity == "channel":
        return {"axis": spec.axis}
    assert spec.block_size is not None
    return {"axis": spec.axis, "block_size": spec.block_size}


def _int_tensor(values: np.ndarray, bits: int, name: str) -> onnx.TensorProto:
    values = np.asarray(values)
    if bits == 8:
        return numpy_helper.from_array(values.astype(np.int8), name)
    # INT4 / INT2 bytes come from sfc.kernels.packing, the layout the kernels read.
    data_type = {4: onnx.TensorProto.INT4, 2: onnx.TensorProto.INT2}[bits]
    raw = pack(values, bits).tobytes()
    return helper.make_tensor(name, data_type, values.shape, vals=raw, raw=True)


def _float_tensor(values: np.ndarray, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)


class _Writer:
    """Collects the edits for one graph, then applies them in one ordered pass."""

    def __init__(self, graph: onnx.GraphProto, recipe: Recipe,
                 scales_as_inputs: Collection[str] = (),
                 stored: StoredWeights | None = None) -> None:
        self.graph = graph
        self.stored = stored
        self.scales_as_inputs = set(scales_as_inputs)
        self.new_inputs: list[onnx.ValueInfoProto] = []
        # node name -> the activation inputs the recipe quantizes there
        self.quantized_inputs: dict[str, set[str]] = defaultdict(set)
        for entry in recipe.tensors:
            if entry.kind == "activation":
                for consumer in entry.consumers:
                    self.quantized_inputs[consumer].add(entry.tensor)
        self.index = {n.name: i for i, n in enumerate(graph.node) if n.name}
        self.producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
        self.inputs = {i.name for i in graph.input}
        self.outputs = {o.name for o in graph.output}
        self.initializers = {t.name: t for t in graph.initializer}
        self.readers: dict[str, list[int]] = defaultdict(list)
        for i, node in enumerate(graph.node):
            for name in dict.fromkeys(node.input):
                if name:
                    self.readers[name].append(i)
        self.taken = set(self.index) | set(self.producer) | self.inputs | self.outputs
        self.taken |= set(self.initializers) | {v.name for v in graph.value_info}
        self.taken |= set(self.readers)
        self.replaced: dict[str, list[onnx.TensorProto]] = {}  # float init -> its integer form
        self.new_inits: list[onnx.TensorProto] = []
        self.before: dict[int, list[onnx.NodeProto]] = defaultdict(list)
        self.after: dict[int, list[onnx.NodeProto]] = defaultdict(list)  # -1: graph start
        self.renames: dict[int, dict[str, str]] = defaultdict(dict)

    def claim(self, *names: str) -> None:
        for name in names:
            if name in self.taken:
                raise SfcError(f"cannot write Q/DQ: name '{name}' already exists in the graph")
            self.taken.add(name)

    def consumer_indices(self, entry: TensorRecipe) -> list[int]:
        indices = []
        for node in entry.consumers:
            if node not in self.index:
                raise SfcError(f"recipe consumer '{node}' of '{entry.tensor}' is not in the model")
            i = self.index[node]
            if entry.tensor not in self.graph.node[i].input:
                raise SfcError(f"recipe consumer '{node}' does not read '{entry.tensor}'")
            indices.append(i)
        return indices

    def weight(self, entry: TensorRecipe, in_subgraphs: set[str]) -> None:
        name, spec = entry.tensor, entry.spec
        init = self.initializers.get(name)
        if init is None or name in self.inputs:
            raise SfcError(f"weight '{name}' is not a constant initializer of the model")
        if name in self.outputs or name in in_subgraphs:
            raise SfcError(f"weight '{name}' is a graph output or read in a subgraph")
        self.consumer_indices(entry)
        w = numpy_helper.to_array(init)
        if w.dtype != np.float32:
            raise SfcError(f"weight '{name}' is {w.dtype}, not float32")
        if not np.isfinite(w).all():
            raise SfcError(f"weight '{name}' has NaN or Inf values")
        try:
            if entry.method in STORED_METHODS:
                assert self.stored is not None  # write_qdq checks
                q, scales = self.stored.get(name, spec, tuple(w.shape))
            else:
                q, scales = round_to_nearest(w, spec, entry.method)
        except SfcError as exc:
            raise SfcError(f"weight '{name}': {exc}") from None
        readers = self.readers[name]
        several = len(readers) > 1
        shared, shared_written = qdq_names(name), False
        tensors: list[onnx.TensorProto] = []
        for k, i in enumerate(readers):
            names = qdq_names(name, k if several else None)
            node_spec, source = spec, names  # source: the copy this reader's DQ reads
            if entry.gather_spec is not None and self.gathers(i, name):
                # The Gathers' own INT8 copy, from the float weights (gather_copy_int8).
                node_spec = entry.gather_spec
                tensors += self.copy(*round_to_nearest(w, node_spec, "absmax"), node_spec, names)
            elif not several or self.weight_only_matmul(i, name):
                # A private integer + scale copy: ORT fuses DQ -> MatMul into MatMulNBits
                # only if the DQ's integer initializer is read by that DQ alone.
                tensors += self.copy(q, scales, spec, names)
            else:
                source = shared
                if not shared_written:
                    tensors += self.copy(q, scales, spec, shared)
                    shared_written = True
            self.claim(names.dequantized, names.dq_node)
            params = [source.quantized, source.scale]
            if node_spec.zero_point:
                params.append(source.zero_point)
            node = helper.make_node(
                "DequantizeLinear", params, [names.dequantized],
                name=names.dq_node, **_dq_attrs(node_spec),
            )  # fmt: skip
            self.before[i].append(node)
            self.renames[i][name] = names.dequantized
        self.replaced[name] = tensors

    def copy(self, q: np.ndarray, scales: np.ndarray, spec: QuantSpec,
             names: QdqNames) -> list[onnx.TensorProto]:
        """The initializers of one integer copy of a weight (its names claimed); a
        zero-point spec's carried integers are split into stored integers and zero points."""
        self.claim(names.quantized, names.scale)
        if not spec.zero_point:
            return [_int_tensor(q, spec.bits, names.quantized),
                    _float_tensor(scales, names.scale)]
        self.claim(names.zero_point)
        stored, zero = split_zero_points(q, spec)
        return [_int_tensor(stored, spec.bits, names.quantized),
                _float_tensor(scales, names.scale),
                _int_tensor(zero, spec.bits, names.zero_point)]

    def gathers(self, index: int, weight: str) -> bool:
        """Whether node `index` is a Gather reading `weight` as its data (a table lookup)."""
        node = self.graph.node[index]
        return node.op_type == "Gather" and node.domain in _DEFAULT_DOMAINS \
            and node.input[0] == weight

    def weight_only_matmul(self, index: int, weight: str) -> bool:
        """Whether node `index` is a MatMul reading `weight` as B with a float A input."""
        node = self.graph.node[index]
        return (
            node.op_type == "MatMul"
            and node.domain in _DEFAULT_DOMAINS
            and list(node.input[1:2]) == [weight]
            and node.input[0] != weight
            and node.input[0] not in self.quantized_inputs.get(node.name, ())
        )

    def activation(self, entry: TensorRecipe) -> None:
        name, spec = entry.tensor, entry.spec
        if name in self.initializers and name not in self.inputs:
            raise SfcError(f"activation '{name}' is a constant initializer, not an activation")
        if name not in self.producer and name not in self.inputs:
            raise SfcError(f"activation '{name}' is not a tensor of the model")
        consumers = self.consumer_indices(entry)
        assert entry.scale is not None  # TensorRecipe guarantees it for activations
        scale_input = None
        if name in self.scales_as_inputs:
            scale_input = scale_input_name(name)
            self.claim(scale_input)
            self.new_inputs.append(
                helper.make_tensor_value_info(scale_input, onnx.TensorProto.FLOAT, []))
        for k, i in enumerate(consumers):
            # One Q -> DQ pair per consumer, each with its own scale and zero-point
            # initializers (same values): see the module docstring.
            names = qdq_names(name, k if len(consumers) > 1 else None)
            self.claim(names.zero_point, names.quantized, names.dequantized)
            self.claim(names.q_node, names.dq_node)
            if scale_input is None:
                self.claim(names.scale)
                self.new_inits.append(_float_tensor(np.array(entry.scale), names.scale))
            self.new_inits.append(
                _int_tensor(np.zeros((), dtype=np.int8), spec.bits, names.zero_point))
            params = [scale_input or names.scale, names.zero_point]
            q = helper.make_node(
                "QuantizeLinear", [name, *params], [names.quantized], name=names.q_node
            )
            dq = helper.make_node(
                "DequantizeLinear", [names.quantized, *params], [names.dequantized],
                name=names.dq_node,
            )  # fmt: skip
            self.after[self.producer.get(name, -1)] += [q, dq]
            self.renames[i][name] = names.dequantized

    def apply(self) -> None:
        graph = self.graph
        nodes: list[onnx.NodeProto] = list(self.after[-1])
        for i, original in enumerate(graph.node):
            node = onnx.NodeProto()
            node.CopyFrom(original)
            for j, name in enumerate(node.input):
                if name in self.renames[i]:
                    node.input[j] = self.renames[i][name]
            nodes += [*self.before[i], node, *self.after[i]]
        inits: list[onnx.TensorProto] = []
        for init in graph.initializer:  # integer weights take their float form's place
            inits += self.replaced.get(init.name, [init])
        inits += self.new_inits
        del graph.node[:]
        graph.node.extend(nodes)
        del graph.initializer[:]
        graph.initializer.extend(inits)
        graph.input.extend(self.new_inputs)
        # The version converter records shapes of every tensor; replaced weights are gone.
        kept = [v for v in graph.value_info if v.name not in self.replaced]
        del graph.value_info[:]
        graph.value_info.extend(kept)


def write_qdq(
    model: onnx.ModelProto, recipe: Recipe, *, verify_model: bool = True,
    scales_as_inputs: Collection[str] = (), stored: StoredWeights | None = None,
) -> onnx.ModelProto:
    """The QDQ model for `recipe` applied to the FP32 `model` (which is left untouched).

    `verify_model`: refuse a model whose sha256 differs from the recipe's (a recipe
    replays exactly only on the model it was made for). `scales_as_inputs`: activation
    tensors of the recipe whose scale becomes a float32 scalar graph input named
    `scale_input_name(tensor)` (see the module docstring); the recipe's scale for them is
    then unused. `stored`: the integers and scales of the recipe's stored weights
    (`recipe.weight_data` pins them).
    """
    if isinstance(scales_as_inputs, str):
        raise SfcError("scales_as_inputs must be a collection of tensor names, not one string")
    activations = {t.tensor for t in recipe.tensors if t.kind == "activation"}
    unknown = sorted(set(scales_as_inputs) - activations)
    if unknown:
        raise SfcError(f"scales_as_inputs names '{unknown[0]}', which the recipe does not "
                       "quantize as an activation")
    if verify_model:
        actual = model_sha256(model)
        if actual != recipe.model_sha256:
            expected = recipe.model_sha256[:12]
            raise SfcError(f"recipe was made for model {expected}, not this one ({actual[:12]})")
    if recipe.weight_data is not None:
        if stored is None:
            raise SfcError("the recipe stores weights (weights.npz) and none were given")
        if stored.digest() != recipe.weight_data:
            raise SfcError("stored weights do not match the recipe's weight_data digest")
    opset, ir_version = qdq_versions(model, recipe)
    out = _upgrade(model, opset, ir_version)
    writer = _Writer(out.graph, recipe, scales_as_inputs, stored)
    in_subgraphs = subgraph_reads(out.graph)
    for entry in recipe.tensors:
        if entry.kind == "weight":
            writer.weight(entry, in_subgraphs)
        else:
            writer.activation(entry)
    writer.apply()
    return out
