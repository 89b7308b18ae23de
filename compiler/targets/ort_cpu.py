"""The `ort-cpu` target: ONNX Runtime's CPU graph optimizer lowers QDQ ONNX to integer kernels.

Numeric contract: the lowering only rewrites patterns whose results ORT defines as equal to
the QDQ graph's (DQ(x) -> MatMul <- DQ(w) -> Q becomes QLinearMatMul computing
`y_q = saturate(round((x_q - zx) * (w_q - zw) * sx * sw / sy) + zy)`; without the output Q,
MatMulIntegerToFloat returns the float product; DQ(block weights) -> MatMul becomes
MatMulNBits). Everything ORT cannot fuse stays as it was, and the census reports it. sfc's
own rewrites before it (`ort_rewrites`) keep the integers and scales; with
`fused_attention` the float attention core becomes ORT's `MultiHeadAttention`, equal up to
the order of float sums.

Artifacts (in `out_dir`, named after `stem`):
- `<stem>.ort.onnx`: the optimized graph as ONNX (opens in any ORT build; inspectable).
  MatMulNBits scales that are 8-bit codes times a float16 step per row, or all float16
  values (`QuantSpec.scale_bits` 8, 16), are stored so behind Cast/Mul/Reshape nodes, which
  ORT folds back to float32 at load (`compact_nbits_scales`).
- `<stem>.ort`: the same graph in ORT format (flatbuffers), for minimal/mobile ORT builds
  (saved after ORT's folding, so its scales are float32).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..atomic import staging_dir
from ..cpu import host_isa
from ..errors import SfcError, first_line
from ..onnx_utils import inferred_shapes
from ..quant.spec import ORT_CPU_SATURATING_CAPS
from .base import LoweringResult, artifact_bytes, external_data_files, fusion_census
from .ort_rewrites import apply_rewrites, fuse_integer_matmul_bias
from .tensorrt_plan import ProfileLimits, profiles_for

__all__ = ["ISAS", "NBITS_ACCURACY", "OrtCpuTarget", "compact_nbits_scales", "weight_matmul_rows"]

logger = logging.getLogger(__name__)

# Protobuf cannot serialise a model of 2 GB or more; ORT format (flatbuffers) has the same
# limit. Leave headroom for the graph itself.
_PROTOBUF_LIMIT = 2**31 - 1
_EXTERNAL_MIN_BYTES = 1024  # initializers at least this big go to the external data file


# The CPU classes `ort-cpu:<isa>` builds for. Only the INT8 weight range differs: see
# `sfc.quant.spec.TargetCaps.int8_weight_pair_limit`.
ISAS: dict[str, str] = {
    "vnni": "x86-64 with AVX-512 VNNI, AVX-VNNI or AMX: exact INT8 dot products, 8-bit weights",
    "avx2": "x86-64 without VNNI: u8 x s8 pairs saturate int16, so INT8 weight pairs along K "
    "are limited to |a| + |b| <= 128",
    "arm64": "ARM64 (NEON / dot-product): exact INT8 dot products, 8-bit weights",
}

# ORT fuses DQ(weight) -> MatMul with a float activation into MatMulNBits at this session
# config's accuracy level; its default, 4, quantizes the activation to int8 per block
# itself. Without VNNI that int8 path loses to float when a call has many rows: on an AVX2
# EPYC (onnxruntime 1.32, 2 threads) level 0 ran whisper-tiny.en's encoder window (1500 rows)
# 11-12% faster, while a decoder step (one row) ran 1.8-2.4x slower at it (BENCHMARKS.md,
# issue 13). Level 0 is also the QDQ graph's own numerics: a float activation times the
# dequantized weight.
NBITS_ACCURACY = "session.qdq_matmulnbits_accuracy_level"
_FLOAT_NBITS_MIN_ROWS = 256


def weight_matmul_rows(model: onnx.ModelProto, dims: Mapping[str, int] | None = None
                       ) -> list[int]:
    """Rows per call of each MatMul whose B is a weight (an initializer, or its
    DequantizeLinear) and whose A has a fixed dimension besides the last: the product of
    A's fixed dimensions but the last, after ONNX shape inference with the graph inputs'
    symbolic dimensions named in `dims` fixed to those sizes (other symbolic ones, e.g.
    batch, count 1). MatMuls whose rows are all symbolic or unknown (a decoder step's
    tokens, a Reshape's output) are left out; all are when shapes cannot be inferred
    (e.g. a model of 2 GB or more)."""
    dims = dims or {}
    named = [(d, d.dim_param) for v in model.graph.input
             for d in v.type.tensor_type.shape.dim if d.dim_param in dims]
    try:  # sized in place, no copy of the weights: shape inference copies them already
        for d, name in named:
            d.dim_value = dims[name]
        shapes = inferred_shapes(model)
    finally:
        for d, name in named:
            d.dim_param = name
    graph = model.graph
    constants = {t.name for t in graph.initializer}
    constants |= {n.output[0] for n in graph.node
                  if n.op_type == "DequantizeLinear" and n.input[0] in constants}
    rows = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in constants:
            continue
        shape = shapes.get(node.input[0])
        fixed = [d.dim_value for d in list(shape.dim)[:-1]
                 if d.HasField("dim_value")] if shape is not None else []
        if fixed:
            rows.append(math.prod(fixed))
    return rows


def _coded(values: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(uint8 codes [rows, blocks], float16 steps [rows, 1]) with codes * steps == `values`
    exactly in float32 and each row's step its largest value / 255 (`QuantSpec.scale_bits`
    8), or None where the values are not such codes."""
    grid = values.reshape(rows, -1)
    step = grid.max(axis=1, keepdims=True) / np.float32(255)
    codes = np.rint(grid / step)
    if not (np.array_equal(step.astype(np.float16).astype(np.float32), step)
            and codes.min() >= 1 and codes.max() <= 255
            and np.array_equal(codes.astype(np.float32) * step, grid)):
        return None
    return codes.astype(np.uint8), step.astype(np.float16)


def compact_nbits_scales(model: onnx.ModelProto) -> dict[str, int]:
    """Store each float32 MatMulNBits scale initializer in fewer bytes where its values
    allow it exactly: 8-bit codes times a float16 step per row of N (`QuantSpec.scale_bits`
    8), else float16 where every value is a float16 value; read back to float32 through
    Cast (and Mul, Reshape) nodes, since MatMulNBits takes its scales in the activations'
    type. Returns how many of each. Lossless by construction (the nodes give back the same
    float32 values), and ORT's constant folding removes them when a session loads."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, i))
    done = {"coded8": 0, "float16": 0}
    added: list[onnx.NodeProto] = []
    for name, uses in readers.items():
        init = inits.get(name)
        if init is None or init.data_type != onnx.TensorProto.FLOAT or not all(
                n.op_type == "MatMulNBits" and i == 2 for n, i in uses):
            continue
        values = numpy_helper.to_array(init)
        rows = next((a.i for a in uses[0][0].attribute if a.name == "N"), 0)
        coded = _coded(values, rows) if rows and values.size % rows == 0 else None
        if coded is not None:
            codes, step = coded
            init.CopyFrom(numpy_helper.from_array(codes, f"{name}_codes"))
            graph.initializer.extend([
                numpy_helper.from_array(step, f"{name}_step"),
                numpy_helper.from_array(np.array(values.shape, np.int64), f"{name}_shape")])
            added += [
                helper.make_node("Cast", [init.name], [f"{name}_codes_f"], name=f"{name}_cast",
                                 to=onnx.TensorProto.FLOAT),
                helper.make_node("Cast", [f"{name}_step"], [f"{name}_step_f"],
                                 name=f"{name}_step_cast", to=onnx.TensorProto.FLOAT),
                helper.make_node("Mul", [f"{name}_codes_f", f"{name}_step_f"],
                                 [f"{name}_grid"], name=f"{name}_mul"),
                helper.make_node("Reshape", [f"{name}_grid", f"{name}_shape"], [name],
                                 name=f"{name}_reshape")]
            done["coded8"] += 1
            continue
        half = values.astype(np.float16)
        if not (np.isfinite(half).all() and np.array_equal(half.astype(np.float32), values)):
            continue
        init.CopyFrom(numpy_helper.from_array(half, f"{name}_f16"))
        added.append(helper.make_node("Cast", [init.name], [name], name=f"{name}_cast",
                                      to=onnx.TensorProto.FLOAT))
        done["float16"] += 1
    # Topological order: the added nodes read only initializers and each other, in order.
    nodes = added + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return done


def _ort_session(src: Path, options: Any) -> Any:
    """Open `src` on the CPU provider; ORT's opaque errors become one-line SfcErrors."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(src), sess_options=options,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own classes (Fail, InvalidGraph, ...)
        raise SfcError(f"ONNX Runtime cannot load {src}: {first_line(exc)}") from None


def _options(saved_to: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # EXTENDED, not ALL: level 3 adds NCHWc layout transforms chosen for the *build* machine's
    # CPU (AVX-512 block sizes), so a saved ALL graph can be slower or unloadable elsewhere.
    # EXTENDED holds the QDQ fusions (QLinear*, MatMulIntegerToFloat, MatMulNBits, QGemm) and
    # the float fusions (Gelu, LayerNorm); layout work is left to ORT at load on the device.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(saved_to)
    options.log_severity_level = 3  # errors only: ORT warns about every unused initializer
    options.intra_op_num_threads = 1  # lowering runs nothing; no thread pool needed
    return options


@dataclass(frozen=True)
class OrtCpuTarget:
    """ONNX Runtime on CPU: QDQ INT8 (per-tensor / per-channel) and 2/4/8-bit block weights.

    `ort_format`: also write the ORT-format file. `verify`: load it back in an
    InferenceSession, so a file ORT cannot open never ships.

    `isa`: the CPU class the build is for (a key of `ISAS`; default: this machine's).
    `fused_attention`: float attention cores become ORT's `MultiHeadAttention`
    (`sfc build --fused-attention`).

    Note: on x86-64 ORT rewrites s8 activations to u8 (its faster u8s8 kernels), so the saved
    graph carries u8 activations; it still runs on ARM, where ORT handles both.
    """

    isa: str = field(default_factory=host_isa)
    ort_format: bool = True
    verify: bool = True
    fused_attention: bool = False
    # Symbolic input dimensions at the sizes the graph usually runs at (`for_graph`), for
    # the rows rule of `session_config`: Whisper's encoder input has symbolic frames, as
    # `--encoder-window fit` feeds shorter windows.
    dims: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if self.isa not in ISAS:
            raise SfcError(f"unknown ort-cpu CPU class {self.isa!r}; one of: "
                           + "; ".join(f"ort-cpu:{k} ({v})" for k, v in ISAS.items()))

    @property
    def name(self) -> str:
        """Registry name with the CPU class, e.g. "ort-cpu:avx2"."""
        return f"ort-cpu:{self.isa}"

    @property
    def caps_name(self) -> str:
        """Name of the capabilities entry placement reads."""
        return "ort-cpu:avx2" if self.isa == "avx2" else "ort-cpu"

    @property
    def optimization(self) -> str:
        """ORT's own fusions at load: the deployment path."""
        return "all"

    def session_config(self, model: onnx.ModelProto) -> dict[str, str]:
        """MatMulNBits at accuracy level 0 (float) on AVX2 when every weight MatMul of
        `model` whose rows are known takes at least 256 per call (see `NBITS_ACCURACY`);
        else ORT's default."""
        rows = weight_matmul_rows(model, dict(self.dims)) if self.isa == "avx2" else []
        if rows and min(rows) >= _FLOAT_NBITS_MIN_ROWS:
            return {NBITS_ACCURACY: "0"}
        return {}

    def for_graph(self, card: Any, graph: str) -> OrtCpuTarget:
        """The target with `dims`: the symbolic input sizes `graph` of a Whisper `card`
        usually runs at (its engine profile's opt shapes: a 30 s window, one decoder token
        after a cache of 64). Other models' symbolic dimensions stay unknown."""
        if card is None or card.family != "whisper" or graph not in card.graphs:
            return self
        try:
            profiles = profiles_for(card, graph, ProfileLimits())
        except SfcError:  # a dimension without a Whisper rule: the bare graph's rows
            return self
        sizes: dict[str, int] = {}
        for spec, profile in zip(card.graphs[graph].inputs, profiles, strict=True):
            sizes |= {d: n for d, n in zip(spec.shape, profile.opt, strict=True)
                      if isinstance(d, str)}
        return replace(self, dims=tuple(sorted(sizes.items())))

    def lower(self, qdq_path: Path, out_dir: Path, *, stem: str = "model") -> LoweringResult:
        """Optimize `qdq_path` with ORT and write `<stem>.ort.onnx` (and `<stem>.ort`).

        Both files are written under temporary names and renamed into `out_dir` only when
        both succeed. Models with external data or of 2 GB or more keep their weights in
        `<stem>.ort.onnx.data`; ORT format is skipped at 2 GB or more (flatbuffers limit).
        """
        qdq_path = Path(qdq_path)
        if not qdq_path.is_file():
            raise SfcError(f"QDQ model not found: {qdq_path}")
        try:
            external = external_data_files(qdq_path)
        except Exception as exc:  # protobuf DecodeError and friends
            raise SfcError(f"{qdq_path} is not an ONNX model: {first_line(exc)}") from None
        source_bytes = artifact_bytes(qdq_path)
        large = source_bytes >= _PROTOBUF_LIMIT

        artifact = f"{stem}.ort.onnx"
        ort_name = f"{stem}.ort"
        notes: list[str] = []
        with staging_dir(out_dir) as stage:
            opts = _options(stage / artifact)
            if external or large:
                # The optimized graph is saved by name; the data file name is what it records,
                # so it must be the final name (the staging folder keeps names unchanged).
                opts.add_session_config_entry(
                    "session.optimized_model_external_initializers_file_name", f"{artifact}.data")
                opts.add_session_config_entry(
                    "session.optimized_model_external_initializers_min_size_in_bytes",
                    str(_EXTERNAL_MIN_BYTES))
            source = qdq_path
            model = onnx.load(str(qdq_path))
            for key, value in self.session_config(model).items():
                opts.add_session_config_entry(key, value)
                notes.append(f"{key} = {value}")
            pair_limit = (ORT_CPU_SATURATING_CAPS.int8_weight_pair_limit
                          if self.isa == "avx2" else None)
            fired = {k: v for k, v in apply_rewrites(model, pair_limit,
                                                          self.fused_attention).items() if v}
            if fired:
                notes.append("rewrites: " + ", ".join(f"{k} x{v}" for k, v in fired.items()))
                source = stage / f"{stem}.rewritten.onnx"
                onnx.save(model, str(source), save_as_external_data=bool(external or large),
                          location=f"{stem}.rewritten.onnx.data")
            _ort_session(source, opts)
            for leftover in stage.glob(f"{stem}.rewritten.onnx*"):
                leftover.unlink()
            if not (external or large):
                optimized = onnx.load(str(stage / artifact))
                biased = fuse_integer_matmul_bias(optimized)
                compacted = {k: v for k, v in compact_nbits_scales(optimized).items() if v}
                if biased or compacted:
                    onnx.save(optimized, str(stage / artifact))
                if biased:
                    notes.append(f"bias Adds fused into MatMulIntegerToFloat x{biased}")
                if compacted:
                    notes.append("MatMulNBits scales stored as " + ", ".join(
                        f"{k} x{v}" for k, v in compacted.items()))
            census = fusion_census(onnx.load(str(stage / artifact), load_external_data=False))
            if (external or large) and "MatMulIntegerToFloat" in census.fused:
                notes.append("bias Adds left after MatMulIntegerToFloat (a model with external "
                             "data)")
            if (external or large) and "MatMulNBits" in census.fused:
                # Not built for external data: its file would have to be rewritten whole.
                notes.append("MatMulNBits scales stored float32 (a model with external data)")
            size = artifact_bytes(stage / artifact)

            ort_written: str | None = None
            ort_size: int | None = None
            if self.ort_format and large:
                notes.append("no ORT-format file: the model is 2 GB or more (flatbuffers limit)")
            elif self.ort_format:
                ort_opts = _options(stage / ort_name)
                ort_opts.add_session_config_entry("session.save_model_format", "ORT")
                _ort_session(stage / artifact, ort_opts)
                if self.verify:
                    import onnxruntime as ort

                    check = ort.SessionOptions()
                    check.log_severity_level = 3
                    _ort_session(stage / ort_name, check)
                ort_written, ort_size = ort_name, (stage / ort_name).stat().st_size
            logger.info("lowered %s: fused %s, %d float weighted, %d DQ left", qdq_path,
                        census.fused, len(census.float_weighted), census.dq_remaining)
        return LoweringResult.from_census(
            census, target=self.name, artifact=artifact, ort_format=ort_written, bytes=size,
            ort_format_bytes=ort_size, notes=tuple(notes))
