"""Every TensorRT build decision, in plain Python (no TensorRT import): tested everywhere.

TensorRT cannot be installed on sfc's development and CI machines, so the code that calls
it (`sfc.targets.tensorrt`) only executes these decisions: which network flags for which
version, which builder flags, which optimisation profiles from the model card, which
plugins the graph needs, and how the engine inspector's JSON becomes the report's
per-layer precision table.

Version facts (../shared/guide/tensorrt.md): TensorRT 10.12 deprecated the precision
builder flags in favour of strongly typed networks and TensorRT 11 removed them (strong
typing always on); JetPack 6.1/6.2 (Orin) ships TensorRT 10.3, where sfc builds the
explicit-quantization (Q/DQ) network weakly typed with the INT8/FP16 flags, the path 10.3
documents. Python plugins (`tensorrt.plugin`) exist from 10.6, AOT ones from 10.9.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx

from ..card import ModelCard
from ..errors import SfcError
from ..runtime.features import LogMelSpec

__all__ = [
    "DEFAULT_VERSION",
    "EngineSettings",
    "InputProfile",
    "LayerPrecision",
    "ProfileLimits",
    "TrtVersion",
    "engine_settings",
    "plugins_in",
    "precision_table",
    "profiles_for",
    "quantized_types",
]


@dataclass(frozen=True, order=True)
class TrtVersion:
    """A TensorRT major.minor version."""

    major: int
    minor: int = 0

    @classmethod
    def parse(cls, text: str) -> TrtVersion:
        """'10.3', '10.16', '11' or '11.1' (patch levels are ignored)."""
        m = re.fullmatch(r"\s*(\d+)(?:\.(\d+))?(?:\.\d+)*\s*", text)
        if not m:
            raise SfcError(f"not a TensorRT version: {text!r} (expected e.g. 10.3, 10.16, 11)")
        version = cls(int(m.group(1)), int(m.group(2) or 0))
        if version < cls(10, 0):
            raise SfcError(f"TensorRT {version} is not supported: sfc needs TensorRT >= 10.0 "
                           "(JetPack 5's TensorRT 8.5 lacks INT4 and strongly typed networks)")
        return version

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"

    @property
    def strongly_typed(self) -> bool:
        """Build strongly typed: the only way from 10.12 on (precision flags deprecated)."""
        return self >= TrtVersion(10, 12)

    @property
    def python_plugins(self) -> bool:
        """`tensorrt.plugin` (quickly deployable Python plugins) exists."""
        return self >= TrtVersion(10, 6)

    @property
    def aot_plugins(self) -> bool:
        """Python plugins can carry an ahead-of-time compiled kernel (no Python at run time)."""
        return self >= TrtVersion(10, 9)


# What `--target tensorrt` without a version means when TensorRT is not installed here:
# the current x86 / JetPack 7.2 release line.
DEFAULT_VERSION = TrtVersion(10, 16)


@dataclass(frozen=True)
class ProfileLimits:
    """Ranges of the dynamic dimensions an engine serves.

    Whisper: `max_batch` windows of 30 s at once (longer audio is several windows);
    decoder steps up to `max_decoder_steps` (default: the card's max_target_positions),
    tuned for `opt_decoder_steps`. The runtime reads these limits back from the engines
    and batches and decodes within them (`sfc.runtime.whisper.WhisperRuntime.limits`), so
    the default batch of 1 (an edge device's memory) decodes long audio a window at a
    time and `--max-batch 8` lets it batch as on ONNX Runtime. `dims`: sizes for other
    symbolic dimensions of generic models (min = opt = max; 1 when not given).
    """

    max_batch: int = 1
    opt_batch: int = 1
    max_decoder_steps: int | None = None
    opt_decoder_steps: int = 64
    dims: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 1 <= self.opt_batch <= self.max_batch:
            raise SfcError(f"need 1 <= opt_batch ({self.opt_batch}) <= max_batch "
                           f"({self.max_batch})")
        if self.max_decoder_steps is not None and self.max_decoder_steps < 1:
            raise SfcError("max_decoder_steps must be at least 1")
        if self.opt_decoder_steps < 0:
            raise SfcError("opt_decoder_steps must be non-negative")
        for name, size in self.dims.items():
            if not name or not isinstance(size, int) or size < 1:
                raise SfcError(f"dimension {name!r} needs a positive size, not {size!r}")

    @classmethod
    def parse_dims(cls, items: Sequence[str]) -> dict[str, int]:
        """`["B=4", "T=128"]` (the CLI's `--dim`) -> `{"B": 4, "T": 128}`."""
        dims: dict[str, int] = {}
        for item in items:
            name, eq, size = item.partition("=")
            if not eq or not name.strip() or not size.strip().isdigit():
                raise SfcError(f"--dim takes NAME=SIZE (e.g. batch=4), not {item!r}")
            dims[name.strip()] = int(size)
        return dims

    def cli_args(self) -> str:
        """The `sfc build` options that reproduce these limits ("" for the defaults)."""
        default = ProfileLimits()
        args = [f"--{flag} {value}" for flag, value, base in (
            ("max-batch", self.max_batch, default.max_batch),
            ("opt-batch", self.opt_batch, default.opt_batch),
            ("max-decoder-steps", self.max_decoder_steps, default.max_decoder_steps),
            ("opt-decoder-steps", self.opt_decoder_steps, default.opt_decoder_steps),
        ) if value != base]
        args += [f"--dim {name}={size}" for name, size in sorted(self.dims.items())]
        return " ".join(args)


@dataclass(frozen=True)
class InputProfile:
    """min / opt / max shape of one engine input."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def _whisper_dim(dim: str, card: ModelCard, limits: ProfileLimits) -> tuple[int, int, int]:
    dec = card.decoding
    assert dec is not None
    max_pos = limits.max_decoder_steps or dec.max_target_positions
    prompt = len(dec.prompt)
    if dim == "batch":
        return 1, limits.opt_batch, limits.max_batch
    if dim == "tokens":  # the prompt on the first step, then one token per step
        return 1, 1, prompt
    if dim == "past":  # cache length: 0 on the first step, then grows to the last position
        last = max(0, max_pos - 1)
        return 0, min(limits.opt_decoder_steps, last), last
    if dim in ("frames", "positions"):
        # Engines take the full 30 s window only; shorter ones (`encoder_window`) are an
        # ONNX Runtime option, refused on engines by the runtime.
        frames = LogMelSpec.from_dict(card.preprocessing or {}).n_frames
        size = frames if dim == "frames" else frames // 2
        return size, size, size
    raise SfcError(f"whisper graph input dimension {dim!r} has no profile rule")


def profiles_for(card: ModelCard, graph: str, limits: ProfileLimits) -> tuple[InputProfile, ...]:
    """One optimisation profile (min/opt/max per input) for `graph` of `card`.

    Fixed dimensions stay fixed. Whisper's symbolic ones (batch, tokens, past) follow the
    decoding rules in the card; other models' symbolic dims take `limits.dims`, else 1.
    """
    if graph not in card.graphs:
        raise SfcError(f"{card.name} has no graph {graph!r}")
    out = []
    for spec in card.graphs[graph].inputs:
        lo, opt, hi = [], [], []
        for dim in spec.shape:
            if isinstance(dim, int):
                triple = (dim, dim, dim)
            elif card.family == "whisper" and card.decoding is not None:
                triple = _whisper_dim(str(dim), card, limits)
            else:  # recorded in the report's lowering note with the whole profile
                size = int(limits.dims.get(str(dim), 1))
                triple = (size, size, size)
            lo.append(triple[0])
            opt.append(triple[1])
            hi.append(triple[2])
        out.append(InputProfile(spec.name, tuple(lo), tuple(opt), tuple(hi)))
    return tuple(out)


def quantized_types(model: onnx.ModelProto) -> frozenset[str]:
    """Integer types the model's Q/DQ nodes use ("INT8", "INT4", ...), from zero points or
    quantized initializers; reads only the graph structure."""
    inits = {i.name: i.data_type for i in model.graph.initializer}
    found = set()
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        candidates = [node.input[2]] if len(node.input) > 2 and node.input[2] else []
        if node.op_type == "DequantizeLinear":
            candidates.append(node.input[0])
        for name in candidates:
            if name in inits:
                found.add(onnx.TensorProto.DataType.Name(inits[name]))
    return frozenset(found)


def plugins_in(model: onnx.ModelProto) -> tuple[str, ...]:
    """`namespace::op` of every plugin node (a node with a `plugin_namespace` attribute)."""
    found = set()
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.name == "plugin_namespace":
                found.add(f"{attr.s.decode()}::{node.op_type}")
    return tuple(sorted(found))


@dataclass(frozen=True)
class EngineSettings:
    """What the TensorRT builder is asked to do for one graph (recorded in the report)."""

    version: TrtVersion
    strongly_typed: bool
    builder_flags: tuple[str, ...]  # BuilderFlag member names; empty when strongly typed
    workspace_bytes: int
    profiles: tuple[InputProfile, ...]
    plugins: tuple[str, ...]
    timing_cache: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the report."""
        return {"version": str(self.version), "strongly_typed": self.strongly_typed,
                "builder_flags": list(self.builder_flags),
                "workspace_bytes": self.workspace_bytes,
                "profiles": [{"name": p.name, "min": list(p.min), "opt": list(p.opt),
                              "max": list(p.max)} for p in self.profiles],
                "plugins": list(self.plugins), "timing_cache": self.timing_cache}


def engine_settings(model: onnx.ModelProto, card: ModelCard, graph: str, version: TrtVersion,
                    limits: ProfileLimits, *, workspace_bytes: int = 1 << 30,
                    timing_cache: str | None = None) -> EngineSettings:
    """Decide how to build `graph` (its TensorRT-ready QDQ `model`) for `version`.

    Strongly typed from 10.12 (precision comes from the Q/DQ nodes and the graph's float
    type only). Before that (10.3 on JetPack 6) the network is weakly typed and the flags
    allow what the Q/DQ nodes ask for (INT8, INT4) plus FP16 for the float layers.

    Raises:
        SfcError: the graph needs a Python plugin this version does not have.
    """
    if workspace_bytes < 1 << 20:
        raise SfcError("the TensorRT workspace must be at least 1 MiB")
    plugins = plugins_in(model)
    if plugins and not version.aot_plugins:
        raise SfcError(f"{graph} needs the plugin(s) {', '.join(plugins)}, which sfc ships "
                       f"as AOT Python plugins (TensorRT >= 10.9); TensorRT {version} has "
                       "none: build with 4- or 8-bit weights for this version")
    flags: tuple[str, ...] = ()
    if not version.strongly_typed:
        types = quantized_types(model)
        flags = tuple(f for f, t in (("INT8", "INT8"), ("INT4", "INT4")) if t in types)
        flags += ("FP16",)
    return EngineSettings(version, version.strongly_typed, flags, workspace_bytes,
                          profiles_for(card, graph, limits), plugins, timing_cache)


@dataclass(frozen=True)
class LayerPrecision:
    """One engine layer as the engine inspector describes it."""

    name: str
    layer_type: str
    inputs: tuple[str, ...]  # data types of its inputs ("Int8", "Half", ...)
    outputs: tuple[str, ...]
    tactic: str


def _dtypes(tensors: Any) -> tuple[str, ...]:
    out = []
    for t in tensors or ():
        text = str(t.get("Format/Datatype", "")) if isinstance(t, dict) else ""
        # e.g. "Row major linear INT8 format" or "Int8": keep the type word.
        m = re.search(r"\b(FP32|FP16|Float|Half|BF16|Int8|INT8|Int4|INT4|FP8|Int32|INT32|Bool)\b",
                      text, re.IGNORECASE)
        out.append(m.group(1).upper() if m else (text or "?"))
    return tuple(out)


def precision_table(inspector_json: str) -> tuple[LayerPrecision, ...]:
    """Parse `EngineInspector.get_engine_information(LayerInformationFormat.JSON)`.

    Needs an engine built with `ProfilingVerbosity.DETAILED` (otherwise layers are bare
    names, which become rows with unknown types).
    """
    try:
        data = json.loads(inspector_json)
    except json.JSONDecodeError as exc:
        raise SfcError(f"engine inspector output is not JSON ({exc})") from None
    layers = data.get("Layers", []) if isinstance(data, dict) else []
    rows = []
    for layer in layers:
        if isinstance(layer, str):  # ProfilingVerbosity below DETAILED
            rows.append(LayerPrecision(layer, "?", (), (), "?"))
            continue
        rows.append(LayerPrecision(
            str(layer.get("Name", "?")), str(layer.get("LayerType", "?")),
            _dtypes(layer.get("Inputs")), _dtypes(layer.get("Outputs")),
            str(layer.get("TacticName", layer.get("TacticValue", "?")))))
    return tuple(rows)
