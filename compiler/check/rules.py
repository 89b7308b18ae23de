"""The portability rules: each a small class that reads a `GraphView` and a `Profile`.

A rule has an `id` (the name findings carry) and `check(view, profile)`, which yields
`Finding`s naming the node and the fix. `RULES` lists them in report order. Rules that
own a family of types (unsigned, sub-4-bit) are the only ones that report it, so one
fact gives one finding per node. Facts and their sources are in `profiles.py`; the
TensorRT ones come from ../shared/guide/tensorrt.md ("the guide") unless noted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
from onnx import TensorProto

from ..quant.spec import ORT_CPU_CAPS
from ..quant.weights import pairs_over
from ..targets.trt_rewrites import PLUGIN_NAMESPACE, PLUGIN_OP
from .findings import MODEL_NODE, Finding, Severity
from .graph import DEFAULT_DOMAINS, GraphView, QdqNode, type_name
from .profiles import (
    FP4_TYPES,
    FP8_TYPES,
    INT4_TYPES,
    SUB4BIT_TYPES,
    UNSIGNED_TYPES,
    Profile,
    format_arch,
)

__all__ = ["RULES", "Rule"]

_KIND = {"Q": "QuantizeLinear", "DQ": "DequantizeLinear"}
_SYMMETRIC_FIX = ("requantize symmetric with sfc build (ONNX Runtime: quantize_static with "
                  "QuantType.QInt8 and extra_options ActivationSymmetric/WeightSymmetric=True)")
_QDQ_FORMAT_FIX = "export QDQ (QuantFormat.QDQ) instead of QOperator / dynamic quantization"
_JETPACK6_FIX = ("build with the W8/W4 fallback for JetPack 6 or upgrade to JetPack 7.2 / "
                 "TRT 10.16")


def _types(types: frozenset[int]) -> str:
    return ", ".join(sorted(type_name(t) for t in types))


def _attr_str(node: onnx.NodeProto, name: str) -> str | None:
    for a in node.attribute:
        if a.name == name:
            return a.s.decode("utf-8", "replace")
    return None


def _norm_axis(axis: int, rank: int | None) -> int | None:
    if rank is None:
        return axis if axis >= 0 else None
    return axis % rank if -rank <= axis < rank else None


class Rule:
    """Base of the rules: an id, a one-line why, and `check`."""

    id: ClassVar[str] = ""
    why: ClassVar[str] = ""

    def check(self, view: GraphView, profile: Profile) -> Iterator[Finding]:
        """The findings of this rule on `view` for `profile`."""
        raise NotImplementedError

    def finding(self, severity: Severity, node: str, message: str, fix: str = "") -> Finding:
        """A finding of this rule."""
        return Finding(severity=severity, rule=self.id, node=node, message=message, fix=fix)


class VersionRule(Rule):
    """Default-domain opset and IR version against what the runtime documents or accepts."""

    id = "opset-ir"
    why = "a parser built against an older ONNX may not know newer opsets or IR versions"

    def check(self, view: GraphView, profile: Profile) -> Iterator[Finding]:
        opset = view.default_opset
        if opset is not None and opset > profile.max_opset:
            sev: Severity = "error" if profile.opset_confirmed else "warning"
            doubt = "" if profile.opset_confirmed else "; unconfirmed whether it is rejected"
            yield self.finding(
                sev, MODEL_NODE,
                f"default-domain opset {opset} > {profile.max_opset} ({profile.opset_source}"
                f"{doubt})",
                f"convert to opset <= {profile.max_opset} if the quantized types allow it "
                "(INT4 Q/DQ needs 21, INT2 25), or target a newer runtime")
        if view.ir_version > profile.max_ir:
            sev = "error" if profile.ir_confirmed else "warning"
            doubt = "" if profile.ir_confirmed else "; unconfirmed whether it is rejected"
            yield self.finding(
                sev, MODEL_NODE,
                f"IR version {view.ir_version} > {profile.max_ir} ({profile.ir_source}{doubt})",
                f"save with model.ir_version = {profile.max_ir} or lower (at least "
                "onnx.helper.find_min_ir_version_for(opset_import))")


class ParserOpRule(Rule):
    """Ops TensorRT's ONNX parser has no importer for: QOperator and dynamic quantization."""

    id = "parser-op"
    why = "QLinear*, *Integer, DynamicQuantizeLinear and com.microsoft ops are not parsed"

    def check(self, view: GraphView, profile: Profile) -> Iterator[Finding]:
        if not profile.is_tensorrt:
            return
        for name, node in view.nodes:
            domain = node.domain or "ai.onnx"
            rejected = node.domain in profile.rejected_domains or (
                node.domain in DEFAULT_DOMAINS
                and (node.op_type in profile.rejected_ops or node.op_type.startswith("QLinear")))
            if rejected:
                yield self.finding(
                    "error", name,
                    f"{domain}::{node.op_type} has no TensorRT ONNX parser importer",
                    _QDQ_FORMAT_FIX)


class ZeroPointRule(Rule):
    """TensorRT: a zero point must be a constant all-zero tensor."""

    id = "zero-point"
    why = "the parser: 'TensorRT only supports symmetric quantization'"

    def check(self, view: GraphView, profile: Profile) -> Iterator[Finding]:
        if not profile.symmetric_only:
            return
        for q in view.qdq:
            if q.zero_point is None:
                continue
            if not view.is_constant(q.zero_point):
                yield self.finding("error", q.name,
                                   f"zero point '{q.zero_point}' is not a constant",
                                   _SYMMETRIC_FIX)
                continue
            zp = view.array(q.zero_point)
            if zp is None:
                continue
            nonzero = np.flatnonzero(zp.astype(np.float64).ravel())
            if nonzero.size:
                first = zp.ravel()[nonzero[0]]
                yield self.finding(
                    "error", q.name,
                    f"zero point '{q.zero_point}' has {nonzero.size} of {zp.size} values "
                    f"non-zero (e.g. {first}): TensorRT only supports symmetric quantization",
                    _SYMMETRIC_FIX)


class UnsignedTypeRule(Rule):
    """TensorRT: quantized types are signed (UINT8 exists only as network I/O)."""

    id = "unsigned-type"
    why = "operators.md: 'UINT8 is only supported as network input or output tensor types'"

    def check(self, view: GraphView, profile: Profile) -> Iterator[Finding]:
        if not profile.symmetric_only:
            return
        for q in view.qdq:
            if q.qtype in UNSIGNED_TYPES - SUB4BIT_TYPES:
                yield self.finding(
                    "error", q.name,
                    f"{_KIND[q.kind]} of {type_name(q.qtype)} (asymmetric unsigned): TensorRT "
                    "quantizes to signed INT8/INT4 only",
                    _SYMMETRIC_FIX)


class QuantTypeRule(Rule):
    """A Q/DQ type the runtime has no quantized type for (families owned elsewhere excepted)."""

    id = "quant-type"
    why = "the runtime's quantized types (profile.quant_types)"

    def check(self, view: GraphView, profile: Profile) -> Iterator[Finding]:
        owned = (UNSIGNED_TYPES | SUB4BIT_TYPES) if profile.symmetric_only else frozenset()
        for q in view.qdq:
            if q.qtype is None or q.qtype in profile.quant_types or q.qtype in owned:
                continue
            t = type_name(q.qtype)
            if q.qtype == TensorProto.INT32:
                fix = "keep biases float (ONNX Runtime: extra_options={'QuantizeBias': False})"
                what = "INT32 (a quantized bias)"
            elif q.qtype in FP4_TYPES and profile.is_tensorrt:
                fix = "target tensorrt:10.16 or later (FP4 parsing arrived in 10.8), or use INT4"
                what = t
            else:
                fix = f"requantize to one of {_types(profile.quant_types)}"
                what = t
            yield self.finding(
                "error", q.name,
                f"{_KIND[q.kind]} of {what}: {profile.name} takes "
                f"{_types(profile.quant_types)}", fix)


class ScaleRule(Rule):
    """Scales: constant, finite, strictly positive; scalar, 1-D or the input's rank."""

    id = "scale"
    why = "TensorRT's parser asserts 'Scale coefficients must all be positive' (guide: shapes)"

    def check(self, view: GraphView, profile: Profile) -> Iterator[Finding]:
        for q in view.qdq:
            if not view.is_constant(q.scale):
                if profile.is_tensorrt:
                    yield self.finding(
                        "error", q.name,
                        f"scale '{q.scale}' is not a constant (TensorRT needs build-time "
                        "scales)",
                        "write scales as initializers (sfc's scales_as_inputs is for "
                        "calibration, never a deployable)")
                else:
                    yield self.finding(
                        "warning", q.name,
                        f"scale '{q.scale}' is not a constant: ONNX Runtime's QDQ fusions need "
                        "constant scales, so this runs as float fake quantization",
                        "write scales as initializers")
                continue
            scale = view.array(q.scale)
            if scale is None:
                continue
            yield from self._values(q, scale)
            yield from self._shape(view, q, scale)

    def _values(self, q: QdqNode, scale: np.ndarray) -> Iterator[Finding]:
        values = scale.astype(np.float64).ravel()
        bad = ~np.isfinite(values)
        if bad.any():
            yield self.finding("error", q.name,
                               f"scale '{q.scale}' has {int(bad.sum())} NaN or Inf values",
                               "recalibrate: every scale must be finite and > 0")
        elif (values <= 0).any():
            yield self.finding(
                "error", q.name,
                f"scale '{q.scale}' has {int((values <= 0).sum())} values <= 0 "
                f"(min {values.min():g}); scales must be strictly positive",
                "recalibrate: every scale must be finite and > 0")

    def _shape(self, view: GraphView, q: QdqNode, scale: np.ndarray) -> Iterator[Finding]:
        data_shape = view.shape(q.data)
        rank = None if data_shape is None else len(data_shape)
        fix = ("use a scalar (per-tensor), 1-D (per-channel along axis) or same-rank (block) "
               "scale")
        if q.block_size:
            if rank is not None and scale.ndim != rank:
                yield self.finding(
                    "error", q.name,
                    f"block scale '{q.scale}' has rank {scale.ndim}, not the input's rank {rank}",
                    fix)
            return
        if scale.ndim > 1:
            yield self.finding(
                "error", q.name,
                f"scale '{q.scale}' has rank {scale.ndim} without block_size: not scalar "
                "(per-tensor) or 1-D (per-channel)", fix)
            return
        if scale.ndim == 1 and scale.size > 1 and data_shape is not None:
            axis = _norm_axis(q.axis, rank)
            dim = None if axis is None else data_shape[axis]
            if axis is None:
                yield self.finding("error", q.name,
                                   f"axis {q.axis} is out of range for a rank-{rank} input", fix)
            elif dim is not None and dim != scale.size:
                yield self.finding(
                    "error", q.name,
                    f"per-channel scale '{q.scale}' has {scale.size} values but axis {axis} "
                    f"of '{q.data}' has {dim}", fix)


def _per_channel(view: GraphView, q: QdqNode) -> bool:
    shape = view.shape(q.scale)
    return not q.block_size and shape is not None and len(shape) == 1 and (shape[0] or 0) > 1


# (op type, input index of the weight) -> output-channel axis of that weight, given its
# rank and the node: MatMul B[..., K, N]: the last; Gemm: 0 with transB=1, else 1 (the
# guide: "follows from layer definitions"); Conv W[K, C, R, S]: 0.
def _output_channel_axis(node: onnx.NodeProto, index: int, rank: int) -> int | None:
    if node.domain not in DEFAULT_DOMAINS or index != 1:
        return None
    if node.op_type == "MatMul":
        return rank - 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "Conv":
        return 0
    return None


class PerChannelRule(Rule):
    """TensorRT: per-channel scales only on constant weights, along the output channels."""

    id = "per-channel"
    why = "the guide: per-channel only on weights; Conv axis 0, MatMul B[K,N] axis 1, Gemm"

    def check(self, view: GraphView, profile: Profile) -> Iterator[Finding]:
        if not profile.per_channel_weights_only:
            return
        for q in view.qdq:
            if not _per_channel(view, q):
                continue
            if not q.weight:
                yield self.finding(
                    "error", q.name,
                    f"per-channel scale on activation '{q.data}': TensorRT takes per-channel "
                    "scales only on constant weights",
                    "quantize activations per-tensor (one scalar scale)")
                continue
            if q.kind != "DQ":
                continue  # a weight's Q -> DQ pair: its DQ carries the same axis
            shape = view.shape(q.data)
            if shape is None:
                continue
            axis = _norm_axis(q.axis, len(shape))
            for consumer in view.consumers.get(q.output, ()):
                for index, name in enumerate(consumer.input):
                    if name != q.output:
                        continue
                    expected = _output_channel_axis(consumer, index, len(shape))
                    if expected is not None and axis != expected:
                        yield self.finding(
                            "error", q.name,
                            f"per-channel axis {q.axis} of weight '{q.data}' is not the "
                            f"output-channel axis {expected} of {consumer.op_type} "
                            f"'{view.node_name(consumer)}'",
                            f"quantize '{q.data}' per-channel along axis {expected}")


class BlockRule(Rule):
    """Block quantization: TensorRT's types and axes; one blocking dimension everywhere."""

    id = "block"
    why = "the guide: INT4/FP8/FP4 only; last or second-to-last dim; one blocking dim"

    def check(self, view: GraphView, profile: Profile) -> Iterator[Finding]:
        for q in view.qdq:
            if not q.block_size:
                continue
            shape = view.shape(q.data)
            rank = None if shape is None else len(shape)
            axis = _norm_axis(q.axis, rank)
            if profile.is_tensorrt:
                # Types the runtime lacks altogether are reported once, by their own rule.
                if q.qtype in profile.quant_types and q.qtype not in profile.block_types:
                    yield self.finding(
                        "error", q.name,
                        f"block quantization of {type_name(q.qtype)}: TensorRT blocks only "
                        f"{_types(profile.block_types)}",
                        "use per-channel INT8 (sfc build --weights 8) or INT4 blocks "
                        "(--weights 4)")
                if rank is not None and axis is not None and axis < rank - 2:
                    yield self.finding(
                        "error", q.name,
                        f"blocked axis {q.axis} of rank-{rank} '{q.data}': TensorRT blocks "
                        "only the last or second-to-last dimension",
                        "block along K of MatMul's B[K, N] (axis 0 of a 2-D weight)")
            scale_shape = view.shape(q.scale)
            if shape is None or scale_shape is None or len(scale_shape) != len(shape):
                continue
            if axis is None:
                continue
            others = [i for i, (d, s) in enumerate(zip(shape, scale_shape, strict=True))
                      if i != axis and d is not None and d != s]
            dim = shape[axis]
            blocks = None if dim is None else -(-dim // q.block_size)
            if others or (blocks is not None and scale_shape[axis] != blocks):
                yield self.finding(
                    "error", q.name,
                    f"block scale shape {list(scale_shape)} for '{q.data}' {list(shape)} "
                    f"(axis {axis}, block {q.block_size}) must equal the input's shape except "
                    f"along the one blocking axis ({blocks} blocks)",
                    "write one scale per block along a single axis")


class Int4EvenRule(Rule):
    """TensorRT: INT4 tensors need an even last dimension (two values per byte)."""

    id = "int4-even"
    why = "the guide: INT4 tensors need an even last dim"

    def check(self, view: GraphView, profile: Profile) -> Iterator[Finding]:
        if not profile.is_tensorrt:
            return
        for q in view.qdq:
            shape = view.shape(q.data)
            if q.qtype not in INT4_TYPES or not shape or shape[-1] is None:
                continue
            if shape[-1] % 2:
                yield self.finding(
                    "error", q.name,
                    f"INT4 tensor '{q.data}' has an odd last dimension ({shape[-1]})",
                    "keep this weight INT8, or pad its last dimension to an even size")


class Sub4BitRule(Rule):
    """TensorRT: no 2-bit (or any sub-4-bit) DataType; sfc's plugin node carries INT2."""

    id = "sub4bit-type"
    why = "the guide: DataType has INT4 and INT8 but no INT2/INT3"

    def check(self, view: GraphView, profile: Profile) -> Iterator[Finding]:
        if not profile.is_tensorrt:
            return
        fix = ("lower INT2 layers to sfc's W2A16MatMul plugin node (sfc build --target "
               "tensorrt:10.16) or use INT4 blocks (--weights 4)") if profile.python_plugins \
            else _JETPACK6_FIX
        for q in view.qdq:
            if q.qtype in SUB4BIT_TYPES:
                yield self.finding(
                    "error", q.name,
                    f"{_KIND[q.kind]} of {type_name(q.qtype)}: TensorRT has no sub-4-bit "
                    "DataType", fix)


def _is_sfc_plugin(node: onnx.NodeProto) -> bool:
    return node.op_type == PLUGIN_OP and _attr_str(node, "plugin_namespace") == PLUGIN_NAMESPACE


# Domains ONNX Runtime's CPU EP implements itself (custom ops beyond these need a library).
_ORT_DOMAINS = frozenset({*DEFAULT_DOMAINS, "ai.onnx.ml", "com.microsoft"})


class PluginRule(Rule):
    """Plugin nodes: sfc's W2A16MatMul and any other custom-domain op."""

    id = "plugin"
    why = "Python plugins exist from TensorRT 10.6 (AOT 10.9); ORT needs a custom-op library"

    def check(self, view: GraphView, profile: Profile) -> Iterator[Finding]:
        for name, node in view.nodes:
            if node.domain in DEFAULT_DOMAINS:
                continue
            if profile.is_tensorrt and node.domain in profile.rejected_domains:
                continue  # ParserOpRule reports these
            if _is_sfc_plugin(node):
                yield from self._sfc(name, profile)
            elif profile.is_tensorrt:
                yield self.finding(
                    "warning", name,
                    f"{node.domain}::{node.op_type} has no parser importer: the fallback plugin "
                    f"importer needs a plugin named {node.op_type} registered",
                    "register a TensorRT plugin for it, or replace the node")
            elif node.domain not in _ORT_DOMAINS:
                yield self.finding(
                    "warning", name,
                    f"custom op {node.domain}::{node.op_type} runs only with its custom-op "
                    "library registered",
                    "register it (SessionOptions.register_custom_ops_library)")

    def _sfc(self, name: str, profile: Profile) -> Iterator[Finding]:
        plugin = f"{PLUGIN_NAMESPACE}::{PLUGIN_OP}"
        if not profile.is_tensorrt:
            yield self.finding(
                "warning", name,
                f"plugin node {plugin} runs in ONNX Runtime only through onnxruntime-extensions "
                "(numpy reference: for checking numerics, not deployment)",
                "pip install onnxruntime-extensions and open the session with "
                "sfc.kernels.ort_ops.session_options(), or deploy the INT2 DQ -> MatMulNBits "
                "file of sfc build --target ort-cpu")
        elif not profile.python_plugins:
            yield self.finding(
                "error", name,
                f"plugin node {plugin} needs Python plugins (tensorrt.plugin, TensorRT >= "
                f"10.6); {profile.name} has none", _JETPACK6_FIX)
        else:
            aot = (" ahead-of-time compiled (TensorRT >= 10.9), so the engine runs without "
                   "Python") if profile.aot_plugins else " (JIT: Python at run time)"
            yield self.finding(
                "info", name,
                f"needs plugin {plugin} registered (sfc.kernels.trt_plugin) when the engine is "
                f"built;{aot}")


class Fp8ArchRule(Rule):
    """TensorRT: FP8 needs compute capability >= 8.9, FP4 >= 10.0 (the profile's device)."""

    id = "fp8-arch"
    why = "the guide: FP8 needs compute capability >= 8.9 (not Orin); ModelOpt: FP4 Blackwell"

    _NEEDS: ClassVar[tuple[tuple[frozenset[int], int, str], ...]] = (
        (FP8_TYPES, 89, "FP8"), (FP4_TYPES, 100, "FP4"))

    def check(self, view: GraphView, profile: Profile) -> Iterator[Finding]:
        if not profile.is_tensorrt:
            return
        for q in view.qdq:
            for types, needed, label in self._NEEDS:
                if q.qtype not in types or q.qtype not in profile.quant_types:
                    continue  # other FP8 variants: QuantTypeRule
                if profile.arch is None:
                    yield self.finding(
                        "warning", q.name,
                        f"{label} needs compute capability >= {format_arch(needed)}; the "
                        f"device of {profile.name} is unknown",
                        "pass --arch (e.g. --arch sm_90) to check a device")
                elif profile.arch < needed:
                    device = format_arch(profile.arch)
                    if profile.device:
                        device = f"{device} ({profile.device})"
                    yield self.finding(
                        "error", q.name,
                        f"{label} needs compute capability >= {format_arch(needed)}; "
                        f"{profile.name} assumes {device}",
                        "use INT8 on this device, or check another with --arch")


class Int4ActivationRule(Rule):
    """INT4 (sub-8-bit) quantizers on activations: TensorRT's INT4 is weight-only."""

    id = "int4-activation"
    why = "TensorRT docs: 'Weight-only quantization is supported for INT4' (W4A16)"

    def check(self, view: GraphView, profile: Profile) -> Iterator[Finding]:
        types = INT4_TYPES if profile.int4_weight_only else INT4_TYPES | SUB4BIT_TYPES
        for q in view.qdq:
            if q.kind != "Q" or q.weight or q.qtype not in types:
                continue
            t = type_name(q.qtype)
            if profile.int4_weight_only:
                yield self.finding(
                    "error", q.name,
                    f"{t} activation quantizer on '{q.data}': TensorRT's INT4 is weight-only "
                    "(W4A16)", "keep activations float or INT8 (sfc build --activations int8)")
            else:
                yield self.finding(
                    "warning", q.name,
                    f"{t} activation quantizer on '{q.data}': no integer kernel; runs as fake "
                    "quantization", "use INT8 activations for integer kernels (INT4 "
                    "activations are for --target sim accuracy checks)")


class OrtInt2FusionRule(Rule):
    """ONNX Runtime 1.31: INT2 block DQ -> MatMul with N % 4 != 0 fuses into a wrong kernel."""

    id = "ort-int2-fusion"
    why = "measured in sfc (ORT_CPU_CAPS): MatMulNBits of INT2 computes wrong results then"

    def check(self, view: GraphView, profile: Profile) -> Iterator[Finding]:
        if profile.runtime != "ort-cpu":
            return
        multiple = ORT_CPU_CAPS.last_dim_multiple(2)
        for q in view.qdq:
            shape = view.shape(q.data)
            if (q.kind != "DQ" or q.qtype not in SUB4BIT_TYPES or not q.block_size
                    or not q.weight or shape is None or len(shape) != 2 or shape[-1] is None):
                continue
            feeds_matmul_b = any(
                c.op_type == "MatMul" and c.domain in DEFAULT_DOMAINS and c.input[1:2] == [q.output]
                for c in view.consumers.get(q.output, ()))
            if feeds_matmul_b and shape[-1] % multiple:
                yield self.finding(
                    "error", q.name,
                    f"INT2 block weight '{q.data}' has N = {shape[-1]}, not a multiple of "
                    f"{multiple}: onnxruntime 1.31 fuses it into MatMulNBits and computes wrong "
                    "results (measured)",
                    "keep this weight INT8 or INT4 (sfc build falls back to INT8 there)")


class Int8SaturationRule(Rule):
    """ORT CPU without VNNI: INT8 GEMM weight pairs along K beyond the int16 limit."""

    id = "int8-saturation"
    why = ("x86 without VNNI adds u8 x s8 products of K-adjacent weights in a saturating "
           "int16 (vpmaddubsw): 255 x (|a| + |b|) must stay within 32767")

    def check(self, view: GraphView, profile: Profile) -> Iterator[Finding]:
        limit = profile.int8_pair_limit
        if limit is None:
            return
        for q in view.qdq:
            if q.kind != "DQ" or q.qtype != TensorProto.INT8 or not q.weight:
                continue
            gemms = [c for c in view.consumers.get(q.output, ())
                     if c.op_type in ("MatMul", "Gemm", "Conv") and c.input[1:2] == [q.output]]
            values = view.array(q.data) if gemms else None
            if values is None or values.ndim < 2:
                continue
            node = gemms[0]
            # The output-channel axis; K is everything else (MatMul B [K, N], Conv [M, ...]).
            channel = {"MatMul": values.ndim - 1, "Conv": 0}.get(
                node.op_type, 0 if any(a.name == "transB" and a.i for a in node.attribute)
                else 1)
            over = pairs_over(values, channel, limit)
            if over:
                yield self.finding(
                    "error", q.name,
                    f"INT8 weight '{q.data}' has {over} K-adjacent pairs with |a| + |b| > "
                    f"{limit}: on {profile.device}, ONNX Runtime's fused kernels overflow "
                    "int16 and compute wrong sums",
                    "rebuild with sfc build --target ort-cpu:avx2, or "
                    "quantize_static(..., reduce_range=True)")


class Int4DeviceRule(Rule):
    """TensorRT: INT4 weight-only layers on a device where that is unconfirmed (Orin)."""

    id = "int4-unconfirmed"
    why = "the guide: whether INT4 builds on Orin (sm_87) is unconfirmed"

    def check(self, view: GraphView, profile: Profile) -> Iterator[Finding]:
        if not profile.is_tensorrt or profile.arch is None:
            return
        layers = sum(1 for q in view.qdq
                     if q.kind == "DQ" and q.weight and q.qtype in INT4_TYPES)
        if not layers:
            return
        if profile.arch == 87:
            why = ("TensorRT has INT4 weight-only block quantization since 10.0 and strongly "
                   "typed networks since 9.x, but no source confirms INT4 engines build on "
                   "Jetson Orin sm_87 (ModelOpt lists W4A16 for Ampere and later): unconfirmed")
        elif profile.arch < 80:
            why = (f"ModelOpt lists W4A16 for Ampere (sm_80) and later; "
                   f"{format_arch(profile.arch)} is older: unconfirmed")
        else:
            return
        yield self.finding(
            "warning", MODEL_NODE, f"{layers} INT4 weight-only DequantizeLinear nodes: {why}",
            "build the engine on the device once before shipping, and keep the INT8 build as "
            "the fallback")


@dataclass(frozen=True)
class KnownIssue:
    """A reported runtime bug that may hit files with these quantized types on a device."""

    versions: frozenset[str]
    arches: frozenset[int]
    types: frozenset[int]
    message: str
    fix: str


KNOWN_ISSUES: tuple[KnownIssue, ...] = (
    KnownIssue(
        versions=frozenset({"10.16"}), arches=frozenset({87}),
        types=frozenset({TensorProto.INT8}),
        message=("NVIDIA/TensorRT#4832: an INT8 ModelOpt QDQ file failed in Myelin ('Could "
                 "not infer output types for operation: dequantize') on Orin with 10.16.2 "
                 "while the same file built on Thor; unconfirmed for this graph"),
        fix="build the engine on the Orin itself before shipping"),
)


class KnownIssueRule(Rule):
    """Known runtime issues matching the profile and the file's quantized types (info)."""

    id = "known-issue"
    why = "issue trackers (the guide's user reports)"

    def check(self, view: GraphView, profile: Profile) -> Iterator[Finding]:
        present = {q.qtype for q in view.qdq}
        for issue in KNOWN_ISSUES:
            if (profile.is_tensorrt and profile.version in issue.versions
                    and profile.arch in issue.arches and present & issue.types):
                yield self.finding("info", MODEL_NODE, issue.message, issue.fix)


# Report order: the file as a whole, unparseable ops, then per-node quantizer facts.
RULES: tuple[Rule, ...] = (
    VersionRule(),
    ParserOpRule(),
    PluginRule(),
    ZeroPointRule(),
    UnsignedTypeRule(),
    Sub4BitRule(),
    QuantTypeRule(),
    ScaleRule(),
    PerChannelRule(),
    BlockRule(),
    Int4EvenRule(),
    Int4ActivationRule(),
    Fp8ArchRule(),
    OrtInt2FusionRule(),
    Int8SaturationRule(),
    Int4DeviceRule(),
    KnownIssueRule(),
)
