"""What every target is: a name, its capabilities, and a lowering from QDQ ONNX to an artifact.

The QDQ ONNX file is the contract between quantization and lowering (any tool's QDQ model
can be lowered). A target turns it into the artifact its runtime loads and reports, as a
`LoweringResult`, what its runtime actually fused: the census is how a build proves that
the quantized layers run as integer kernels and are not dequantized back to float.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import onnx

from ..atomic import write_json_atomic
from ..errors import SfcError

__all__ = [
    "FLOAT_WEIGHTED_OPS",
    "FUSED_OPS",
    "FusionCensus",
    "LoweringResult",
    "Target",
    "artifact_bytes",
    "external_data_files",
    "fusion_census",
    "is_fused_op",
]

RESULT_TYPE = "LoweringResult"
RESULT_VERSION = 1

# Integer-kernel ops ORT's optimizer (or ORT's own quantizers) produce; every QLinear* op
# counts too (QLinearAdd, QLinearMul, QLinearSigmoid, QLinearConcat, QLinearSoftmax, ...).
FUSED_OPS = frozenset({
    "QLinearMatMul",          # INT8 QDQ MatMul with a Q on its output
    "MatMulIntegerToFloat",   # INT8 QDQ MatMul whose output stays float
    "QLinearConv",            # INT8 Conv (s8 per-channel weights)
    "MatMulNBits",            # DQ(2/4/8-bit block weights) + MatMul
    "DynamicQuantizeMatMul",  # quantize_dynamic's MatMul
    "QGemm",                  # INT8 MatMul + bias Add, or Gemm
    "MatMulInteger",
    "ConvInteger",
    "QAttention",
    "QEmbedLayerNormalization",
    "DynamicQuantizeLSTM",
    "GatherBlockQuantized",
})

# Ops that do the model's heavy arithmetic; one of them left in float with a constant
# weight operand is a weight that was not lowered to an integer kernel.
FLOAT_WEIGHTED_OPS = frozenset({
    "MatMul", "Gemm", "Conv", "ConvTranspose", "FusedMatMul", "FusedGemm", "FusedConv",
})

# Ops through which a constant stays a constant (a weight seen through its DQ, a folded
# transpose, a cast). Anything else makes the value an activation.
_CONST_PASSTHROUGH = frozenset({
    "DequantizeLinear", "Transpose", "Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze",
    "Flatten",
})


def is_fused_op(op_type: str) -> bool:
    """True for an integer-kernel op type (the ones `FusionCensus.fused` counts)."""
    return op_type in FUSED_OPS or op_type.startswith("QLinear")


@dataclass(frozen=True)
class FusionCensus:
    """What a lowered graph computes in integer kernels and what it left in float.

    `fused`: op type -> count of integer-kernel nodes. `float_weighted`: names of float
    MatMul/Gemm/Conv nodes with a constant (weight) operand. `float_activation`: names of
    float MatMuls whose operands are all activations (attention's QK^T and AV); no weight
    quantization can lower those. `dq_remaining` / `q_remaining`: DequantizeLinear /
    QuantizeLinear nodes left (boundaries between integer and float regions, or
    unfused weights). `op_counts`: every op type, for the report.
    """

    fused: dict[str, int]
    float_weighted: tuple[str, ...]
    float_activation: tuple[str, ...]
    dq_remaining: int
    q_remaining: int
    op_counts: dict[str, int]


def _constants(graph: onnx.GraphProto, outer: frozenset[str]) -> set[str]:
    """Names of values in `graph` that are constant: initializers, Constant outputs, and
    pass-through ops (DQ, Transpose, ...) applied to constants only."""
    const = set(outer) | {i.name for i in graph.initializer}
    const |= {i.values.name for i in graph.sparse_initializer}
    # Nodes are topologically sorted in a valid ONNX graph, so one forward sweep suffices.
    for node in graph.node:
        data_inputs = [i for i in node.input if i]
        if node.op_type == "Constant" or (
            node.op_type in _CONST_PASSTHROUGH and data_inputs
            and all(i in const for i in data_inputs)
        ):
            const.update(o for o in node.output if o)
    return const


def _census_graph(graph: onnx.GraphProto, outer: frozenset[str], ops: Counter[str],
                  weighted: list[str], activation: list[str]) -> None:
    const = _constants(graph, outer)
    for node in graph.node:
        ops[node.op_type] += 1
        if node.op_type not in FLOAT_WEIGHTED_OPS:
            pass
        # Conv's weight is input 1; MatMul/Gemm take a constant on either side.
        elif any(i in const for i in node.input[:2] if i):
            weighted.append(node.name or node.output[0])
        elif node.op_type in ("MatMul", "FusedMatMul"):
            activation.append(node.name or node.output[0])
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                _census_graph(sub, frozenset(const), ops, weighted, activation)


def fusion_census(model: onnx.ModelProto) -> FusionCensus:
    """Count integer-kernel ops and list float weighted ops of `model` (subgraphs included).

    Pure: reads only the graph structure, so a model loaded with
    `load_external_data=False` works as well as a fully loaded one.
    """
    ops: Counter[str] = Counter()
    weighted: list[str] = []
    activation: list[str] = []
    _census_graph(model.graph, frozenset(), ops, weighted, activation)
    return FusionCensus(
        fused={op: n for op, n in sorted(ops.items()) if is_fused_op(op)},
        float_weighted=tuple(weighted),
        float_activation=tuple(activation),
        dq_remaining=ops["DequantizeLinear"],
        q_remaining=ops["QuantizeLinear"],
        op_counts=dict(sorted(ops.items())),
    )


@dataclass(frozen=True)
class LoweringResult:
    """The artifact a target wrote and what its runtime fused.

    `artifact` and `ort_format` are file names inside the output folder (the folder moves
    with them). `bytes` is the artifact's size including its external data file, if any.
    """

    target: str
    artifact: str
    ort_format: str | None
    fused: dict[str, int]
    float_weighted: tuple[str, ...]
    dq_remaining: int
    bytes: int
    float_activation: tuple[str, ...] = ()
    ort_format_bytes: int | None = None
    notes: tuple[str, ...] = field(default=())  # e.g. why no ORT-format file was written
    optimization: str = "all"  # ORT graph optimisation level the artifact must be opened with

    @classmethod
    def from_census(cls, census: FusionCensus, **kwargs: Any) -> LoweringResult:
        """A result whose fusion fields come from `census`."""
        return cls(fused=dict(census.fused), float_weighted=census.float_weighted,
                   float_activation=census.float_activation,
                   dq_remaining=census.dq_remaining, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The versioned JSON-ready envelope."""
        return {"_type": RESULT_TYPE, "_version": RESULT_VERSION, "_data": asdict(self)}

    @classmethod
    def from_dict(cls, envelope: Any) -> LoweringResult:
        """Rebuild from `to_dict` output; SfcError on a foreign or stale envelope."""
        if not isinstance(envelope, Mapping) or envelope.get("_type") != RESULT_TYPE:
            raise SfcError(f"not a {RESULT_TYPE} envelope")
        if envelope.get("_version") != RESULT_VERSION:
            raise SfcError(f"unsupported {RESULT_TYPE} version {envelope.get('_version')!r} "
                           f"(expected {RESULT_VERSION})")
        d = envelope["_data"]
        try:
            return cls(
                target=str(d["target"]), artifact=str(d["artifact"]),
                ort_format=None if d["ort_format"] is None else str(d["ort_format"]),
                fused={str(k): int(v) for k, v in d["fused"].items()},
                float_weighted=_strs(d["float_weighted"]),
                dq_remaining=int(d["dq_remaining"]), bytes=int(d["bytes"]),
                float_activation=_strs(d.get("float_activation", ())),
                ort_format_bytes=(None if d.get("ort_format_bytes") is None
                                  else int(d["ort_format_bytes"])),
                notes=_strs(d.get("notes", ())),
                optimization=str(d.get("optimization", "all")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SfcError(f"malformed {RESULT_TYPE}: {exc!r}") from None

    def save(self, path: Path) -> None:
        """Write the envelope to `path` atomically."""
        write_json_atomic(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: Path) -> LoweringResult:
        """Read a result written by `save`."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise SfcError(f"lowering result not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise SfcError(f"{path} is not valid JSON ({exc})") from None


def _strs(values: Iterable[Any]) -> tuple[str, ...]:
    return tuple(str(v) for v in values)


def external_data_files(path: Path) -> tuple[Path, ...]:
    """External data files an ONNX file references (relative to its folder), deduplicated."""
    model = onnx.load(str(path), load_external_data=False)
    files: dict[str, None] = {}
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            for entry in init.external_data:
                if entry.key == "location":
                    files[entry.value] = None
    return tuple(path.parent / f for f in files)


def artifact_bytes(path: Path) -> int:
    """Size of an ONNX or ORT file plus any external data files it references."""
    path = Path(path)
    size = path.stat().st_size
    if path.suffix == ".onnx":
        size += sum(f.stat().st_size for f in external_data_files(path) if f.is_file())
    return size


@runtime_checkable
class Target(Protocol):
    """A deployment target: what it runs natively and how it lowers QDQ ONNX.

    `caps_name` names the `sfc.quant.spec.TargetCaps` entry the placement rules read for
    this target (kept as a name so targets import nothing from quantization).
    """

    @property
    def name(self) -> str:
        """Registry name, e.g. "ort-cpu"."""
        ...

    @property
    def caps_name(self) -> str:
        """Name of the capabilities entry placement reads."""
        ...

    @property
    def optimization(self) -> str:
        """ORT graph optimisation level its artifacts (and ESC's search sessions) run at."""
        ...

    def session_config(self, model: onnx.ModelProto) -> dict[str, str]:
        """ORT session config entries its lowering fuses `model` (FP32 or QDQ) with, and
        ESC's sessions of it run with, so the search sees the artifact's numerics."""
        ...

    def for_graph(self, card: Any, graph: str) -> Target:
        """This target configured for `graph` of the model `card` describes (TensorRT takes
        its optimisation profile from it); targets that need nothing return themselves."""
        ...

    def lower(self, qdq_path: Path, out_dir: Path, *, stem: str = "model") -> LoweringResult:
        """Lower the QDQ model at `qdq_path` into `out_dir` (files named after `stem`)."""
        ...
