"""What each runtime version accepts, as data: one frozen `Profile` per check target.

Rules read these facts and never a target's name. Every fact says where it comes from
(../shared/guide/tensorrt.md is "the guide"); where no official statement was found the
field's `*_confirmed` flag is False and findings built on it are warnings that say
"unconfirmed".

TensorRT facts, with sources:
- ONNX opsets the parser documents (onnx/onnx-tensorrt docs/operators.md headers):
  "TensorRT 10.0 supports operators in the inclusive range of opset 9 to opset 20";
  "TensorRT 10.15 ... opset 9 to opset 24". No table for 10.3 or 10.16 was found, so their
  limits (20, 24) are the nearest documented ones: unconfirmed. NVIDIA's ONNX Opset Guide
  for TensorRT 11.x: ONNX package 1.20.0, maximum opset 25 (confirmed).
- The parser does not enforce the opset: onnx-tensorrt's ModelImporter.cpp (the 8.x-era
  versions the search index holds) records every opset_import and only warns below opset 7,
  and logs the IR version without checking it. INT4 Q/DQ needs opset 21 (`block_size`,
  INT4 types: ONNX 1.16) while 10.0 already parses INT4, so files above the documented
  opset are expected to parse: a warning, not an error, where unconfirmed.
- ONNX (hence IR) version bundled with the parser (onnx-tensorrt docs/Changelog.md):
  9.0 EA "Updated ONNX submodule to v1.14.0"; 10.0 EA "Added support for INT4
  quantization" (INT4 types need ONNX 1.16, IR 10); 10.6 "Updated ONNX submodule version
  to 1.17.0" (so 10.3 has <= 1.16: IR 10, inferred); 10.11 "Updated ONNX version to 1.18"
  (IR 11; no later bump up to 10.15's entry, so 10.16: IR 11, unconfirmed); TensorRT 11:
  ONNX 1.20.0 (IR 13; onnx.helper.VERSION_TABLE).
- Quantized types: NvInfer.h DataType has INT8, FP8 (E4M3), INT4, FP4 and no INT2/INT3
  (the guide); operators.md 10.15: DequantizeLinear takes "INT8, FP8, FP4, INT4",
  "x_zero_point must be zero", "UINT8 is only supported as network input or output tensor
  types". FP4 (FLOAT4E2M1) was added to the parser in 10.8 (Changelog), so 10.3 has none.
- Python plugins: parser "Added support for parsing nodes with Quickly Deployable Plugins"
  in 10.6, "Added support for Python AOT plugins" in 10.9 (Changelog; the guide agrees).
- Strongly typed networks exist since TensorRT 9.x (TensorRT OSS v9.2.0 notes mention
  preserving precision "when using strongly typed mode"; 10.x Python API documents
  NetworkDefinitionCreationFlag.STRONGLY_TYPED), deprecated-as-flag in 11 (always on).
- Devices: JetPack 6.1/6.2 ships TensorRT 10.3 for Orin (sm_87); JetPack 7.2 ships 10.16
  for Orin and Thor (the guide). 10.3 and 10.16 therefore assume Orin, the weakest device
  that runs them; `--arch sm_110` checks Thor, `--arch sm_90` an H100.

TensorRT 10.3 (JetPack 6) against the later profiles, from the sources above: it has
strongly typed networks (since 9.x) and INT4 weight-only block quantization (parser:
10.0 EA; TensorRT 10.0's announcement: INT4 weight-only quantization with block
quantization), so neither is missing. It lacks Python plugins (10.6; AOT 10.9), FP4 (10.8)
and a documented opset above 20. Whether INT4 engines build on Orin sm_87 is unconfirmed
(the guide; ModelOpt's support matrix lists W4A16 for "Ampere and later" without a Jetson
statement): the `int4-unconfirmed` rule warns, on 10.3 and on 10.16 alike.

Sources: github.com/onnx/onnx-tensorrt docs/operators.md and docs/Changelog.md;
docs.nvidia.com/deeplearning/tensorrt/latest/reference/onnx-opset-guide.html;
docs.nvidia.com/deeplearning/tensorrt/10.11.0/inference-library/work-quantized-types.html
("Weight-only quantization is supported for INT4"); github.com/NVIDIA/TensorRT/issues/4832.

ONNX Runtime facts (onnxruntime 1.31.1, measured on the project's machines): IR 14 is
rejected ("Unsupported model IR version: 14, max supported IR version: 13"); a graph
stamped opset 26 loads when none of its ops has a newer schema (ORT resolves each op to
the newest version it has), so opsets above 25 are a warning; Q/DQ of INT8, UINT8, INT16,
UINT16, INT32 (DQ), INT4, UINT4, INT2, UINT2 and the four FLOAT8 types load on the CPU EP,
FLOAT4E2M1 does not ("Could not find an implementation for DequantizeLinear(25)").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Literal

from onnx import TensorProto

from ..errors import SfcError

__all__ = [
    "FP4_TYPES",
    "FP8_TYPES",
    "INT4_TYPES",
    "PROFILES",
    "SUB4BIT_TYPES",
    "UNSIGNED_TYPES",
    "Profile",
    "format_arch",
    "parse_arch",
    "resolve_profile",
]

Runtime = Literal["tensorrt", "ort-cpu"]


def _types(*names: str) -> frozenset[int]:
    """TensorProto data types by name; names an older onnx lacks (INT2: onnx >= 1.20) drop."""
    return frozenset(getattr(TensorProto, n) for n in names if hasattr(TensorProto, n))


INT4_TYPES = _types("INT4", "UINT4")
SUB4BIT_TYPES = _types("INT2", "UINT2")  # ONNX has no 3-bit type; 2-bit is the only sub-4-bit
UNSIGNED_TYPES = _types("UINT8", "UINT16", "UINT4", "UINT2")
FP8_TYPES = _types("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ")
FP4_TYPES = _types("FLOAT4E2M1")

_TRT10_QUANT = _types("INT8", "INT4", "FLOAT8E4M3FN")  # FP8 is E4M3 only (NvInfer.h)
_TRT_FP4_QUANT = _TRT10_QUANT | FP4_TYPES  # FP4 parsed from 10.8 on
_ORT_QUANT = _types("INT8", "UINT8", "INT16", "UINT16", "INT32", "INT4", "UINT4", "INT2",
                    "UINT2") | FP8_TYPES

# Ops the TensorRT parser rejects (operators.md: QLinearConv, QLinearMatMul, ConvInteger,
# MatMulInteger: N; DynamicQuantizeLinear: "Not supported"). com.microsoft is ONNX
# Runtime's contrib domain (MatMulNBits, QGemm, QLinearAdd, DynamicQuantizeMatMul, ...):
# the parser has no importer for any of it.
_TRT_REJECTED_OPS = frozenset({"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger",
                               "DynamicQuantizeLinear"})
_TRT_REJECTED_DOMAINS = frozenset({"com.microsoft"})


@dataclass(frozen=True)
class Profile:
    """The facts one runtime version fixes about a QDQ ONNX file (see the module docstring).

    `arch`: compute capability x10 the check assumes (87 = sm_87), None when unknown
    (architecture-dependent findings are then warnings); `device` names the device the
    default `arch` stands for ("" once overridden). `quant_types`: ONNX element
    types a Q/DQ may carry. `block_types`: those that may be block-quantized.
    `symmetric_only`: zero points must be constant zeros and types signed.
    `per_channel_weights_only`: per-channel scales only on constant weights, along the
    output-channel axis. `int4_weight_only`: no INT4 activation quantizers.
    `int8_pair_limit`: the most |a| + |b| of K-adjacent INT8 GEMM weight pairs (2k, 2k+1)
    for exact integer kernels, None when all of INT8 is exact.
    """

    name: str
    runtime: Runtime
    version: str
    max_opset: int
    opset_confirmed: bool
    opset_source: str
    max_ir: int
    ir_confirmed: bool
    ir_source: str
    quant_types: frozenset[int]
    block_types: frozenset[int]
    symmetric_only: bool
    per_channel_weights_only: bool
    int4_weight_only: bool
    strongly_typed: bool
    python_plugins: bool
    aot_plugins: bool
    rejected_ops: frozenset[str] = frozenset()
    rejected_domains: frozenset[str] = frozenset()
    arch: int | None = None
    device: str = ""
    int8_pair_limit: int | None = None

    def __post_init__(self) -> None:
        if self.arch is not None and not 30 <= self.arch <= 200:
            raise SfcError(f"{self.name}: compute capability {self.arch} is out of range")
        if not self.block_types <= self.quant_types:
            raise SfcError(f"{self.name}: block_types must be a subset of quant_types")

    @property
    def is_tensorrt(self) -> bool:
        """Whether rules for TensorRT's ONNX parser and builder apply."""
        return self.runtime == "tensorrt"

    def with_arch(self, arch: int | None) -> Profile:
        """This profile on another device (compute capability x10)."""
        return replace(self, arch=arch, device="")  # the named device no longer applies


_TRT_103 = Profile(
    name="tensorrt:10.3", runtime="tensorrt", version="10.3",
    max_opset=20, opset_confirmed=False,
    opset_source="operators.md documents opset 9-20 for TensorRT 10.0 (no 10.3 table found)",
    max_ir=10, ir_confirmed=False,
    ir_source="ONNX 1.16 (IR 10) inferred: the parser's ONNX became 1.17 only in 10.6",
    quant_types=_TRT10_QUANT, block_types=_types("INT4", "FLOAT8E4M3FN"),
    symmetric_only=True, per_channel_weights_only=True, int4_weight_only=True,
    strongly_typed=True, python_plugins=False, aot_plugins=False,
    rejected_ops=_TRT_REJECTED_OPS, rejected_domains=_TRT_REJECTED_DOMAINS,
    arch=87, device="Jetson Orin, JetPack 6",
)

_TRT_1016 = Profile(
    name="tensorrt:10.16", runtime="tensorrt", version="10.16",
    max_opset=24, opset_confirmed=False,
    opset_source="operators.md documents opset 9-24 for TensorRT 10.15 (no 10.16 table found)",
    max_ir=11, ir_confirmed=False,
    ir_source="ONNX 1.18 (IR 11): the parser's ONNX became 1.18 in 10.11, no later bump found",
    quant_types=_TRT_FP4_QUANT, block_types=_types("INT4", "FLOAT8E4M3FN", "FLOAT4E2M1"),
    symmetric_only=True, per_channel_weights_only=True, int4_weight_only=True,
    strongly_typed=True, python_plugins=True, aot_plugins=True,
    rejected_ops=_TRT_REJECTED_OPS, rejected_domains=_TRT_REJECTED_DOMAINS,
    arch=87, device="Jetson Orin, JetPack 7.2",
)

_TRT_11 = Profile(
    name="tensorrt:11", runtime="tensorrt", version="11",
    max_opset=25, opset_confirmed=True,
    opset_source="NVIDIA's ONNX Opset Guide for TensorRT 11.x: maximum opset 25",
    max_ir=13, ir_confirmed=True,
    ir_source="TensorRT 11.x bundles ONNX 1.20.0 (IR 13)",
    quant_types=_TRT_FP4_QUANT, block_types=_types("INT4", "FLOAT8E4M3FN", "FLOAT4E2M1"),
    symmetric_only=True, per_channel_weights_only=True, int4_weight_only=True,
    strongly_typed=True, python_plugins=True, aot_plugins=True,
    rejected_ops=_TRT_REJECTED_OPS, rejected_domains=_TRT_REJECTED_DOMAINS,
    arch=None, device="",  # no JetPack ships TensorRT 11: unknown until --arch
)

_ORT_CPU = Profile(
    name="ort-cpu", runtime="ort-cpu", version="1.31",
    max_opset=25, opset_confirmed=False,
    opset_source="onnxruntime 1.31 implements opsets up to 25 (ONNX 1.20); measured: a graph "
    "stamped 26 loads when none of its ops has a newer schema",
    max_ir=13, ir_confirmed=True,
    ir_source="measured: onnxruntime 1.31.1 rejects IR 14 (max supported IR version: 13)",
    quant_types=_ORT_QUANT, block_types=_ORT_QUANT - FP8_TYPES,
    symmetric_only=False, per_channel_weights_only=False, int4_weight_only=False,
    strongly_typed=False, python_plugins=False, aot_plugins=False,
    arch=None, device="CPU",
)

# ORT CPU on x86 without VNNI: its u8 x s8 GEMMs (vpmaddubsw) add the products of
# K-adjacent weight pairs in a saturating int16: 255 x 128 = 32640 fits, 255 x 254 does
# not (measured in sfc: tests/test_targets_ort_cpu.py; OpenVINO calls it the "saturation
# issue"; ONNX Runtime's `reduce_range` 7-bit weights satisfy the limit).
_ORT_CPU_AVX2 = replace(_ORT_CPU, name="ort-cpu:avx2", device="an x86 CPU without VNNI",
                        int8_pair_limit=128)

PROFILES: dict[str, Profile] = {p.name: p for p in (_TRT_103, _TRT_1016, _TRT_11, _ORT_CPU,
                                                     _ORT_CPU_AVX2)}

_ARCH = re.compile(r"\s*(?:sm_?)?(\d+)(?:\.(\d))?\s*", re.IGNORECASE)


def parse_arch(text: str) -> int:
    """'sm_87', 'sm87', '87' or '8.7' -> 87. SfcError on anything else."""
    m = _ARCH.fullmatch(text)
    if not m:
        raise SfcError(f"not a compute capability: {text!r} (expected e.g. sm_87, sm_90)")
    value = int(m.group(1)) * 10 + int(m.group(2)) if m.group(2) else int(m.group(1))
    if not 30 <= value <= 200:
        raise SfcError(f"compute capability {text!r} is out of range (sm_30 .. sm_200)")
    return value


def format_arch(arch: int | None) -> str | None:
    """87 -> 'sm_87'; None stays None."""
    return None if arch is None else f"sm_{arch}"


def _profile_name(target: str) -> str:
    base, sep, version = target.strip().lower().partition(":")
    if base == "ort-cpu":  # ARM and VNNI run all of INT8 exactly: the plain profile
        return "ort-cpu:avx2" if version.strip() == "avx2" else "ort-cpu"
    if base != "tensorrt":
        return target.strip().lower()
    from ..targets.tensorrt_plan import DEFAULT_VERSION, TrtVersion

    # `tensorrt` alone means what `sfc build --target tensorrt` builds for; patch levels
    # (10.16.2) are ignored, as TensorRT's ONNX support changes only with minor versions.
    parsed = TrtVersion.parse(version) if sep and version.strip() else DEFAULT_VERSION
    return f"tensorrt:{parsed.major}" if parsed.minor == 0 else f"tensorrt:{parsed}"


def resolve_profile(target: str, arch: str | None = None) -> Profile:
    """The profile for `target` ('tensorrt:10.3', 'tensorrt:10.16', 'tensorrt:11' or
    'ort-cpu'), on the device `arch` overrides ('sm_90'). SfcError when unknown."""
    name = _profile_name(target)
    profile = PROFILES.get(name)
    if profile is None:
        known = ", ".join(PROFILES)
        raise SfcError(f"unknown check target {target!r}; known: {known}")
    if arch is None:
        return profile
    if not profile.is_tensorrt:
        raise SfcError(f"--arch applies to TensorRT targets, not {profile.name}")
    return profile.with_arch(parse_arch(arch))
