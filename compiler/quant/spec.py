"""What one quantizer is (`QuantSpec`) and what a target runs natively (`TargetCaps`).

sfc quantizers are signed and symmetric (zero point 0) except block weights on targets
that run zero points (`TargetCaps.block_zero_point`): TensorRT rejects any other zero
point ("TensorRT only supports symmetric quantization"), while ONNX Runtime's
MatMulNBits takes one per block, and a zero point halves INT4's squared rounding error on
Whisper's weights (whose blocks are rarely centred on 0). So a spec is bits, granularity,
axis, block size, whether blocks have a zero point, and how many bits each block's scale
is stored in (`scale_bits`: 32; 16, float16 values; 8, codes times a float16 step per
column).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from ..errors import SfcError

__all__ = [
    "INT_RANGES",
    "ORT_CPU_CAPS",
    "ORT_CPU_SATURATING_CAPS",
    "SCALE_BITS",
    "SIM_CAPS",
    "TENSORRT_CAPS",
    "Granularity",
    "QuantSpec",
    "TargetCaps",
    "min_opset",
]

Granularity = Literal["tensor", "channel", "block"]

# Bits a block scale may be stored in: float32; float16 (as llama.cpp's q4_0; half the
# scale cost of INT4 in blocks of 32, at a relative rounding of the scale <= 2^-11); or 8:
# a code in 1..255 times one float16 step per column (`weights.stored_scales`), as
# llama.cpp's k-quants keep integer block scales under float16 super-scales.
SCALE_BITS = (32, 16, 8)

# Signed two's-complement ranges; the DQ input types are INT8 / INT4 / INT2.
INT_RANGES: dict[int, tuple[int, int]] = {8: (-128, 127), 4: (-8, 7), 2: (-2, 1)}

_GRANULARITIES = ("tensor", "channel", "block")
_MIN_BLOCK = 16  # ORT's MatMulNBits and DQ fusion need a power of two >= 16


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class QuantSpec:
    """A signed quantizer, symmetric unless `zero_point`.

    `granularity`: "tensor" (one scale), "channel" (one scale per index of `axis`) or
    "block" (one scale per `block_size` consecutive elements along `axis`, per index of
    every other axis: the ONNX DequantizeLinear `block_size` layout).
    `pair_limit`: a per-channel weight's integers, flattened along the axes other than
    `axis` (the GEMM reduction K), obey |q[2k]| + |q[2k+1]| <= pair_limit (128 on CPUs
    whose INT8 kernels add product pairs in int16; see `TargetCaps`).
    """

    bits: int
    granularity: Granularity
    axis: int | None = None
    block_size: int | None = None
    pair_limit: int | None = None
    zero_point: bool = False
    scale_bits: int = 32

    def __post_init__(self) -> None:
        if not _is_int(self.bits) or self.bits not in INT_RANGES:
            raise SfcError(f"quantizer bits must be one of 2, 4, 8, not {self.bits!r}")
        if self.granularity not in _GRANULARITIES:
            raise SfcError(
                f"quantizer granularity must be tensor, channel or block, not {self.granularity!r}"
            )
        if self.axis is not None and (not _is_int(self.axis) or self.axis < 0):
            raise SfcError(f"quantizer axis must be a non-negative int, not {self.axis!r}")
        if self.pair_limit is not None and (
                not _is_int(self.pair_limit) or self.pair_limit < 1
                or self.granularity != "channel"):
            raise SfcError(f"pair_limit must be a positive int on a per-channel quantizer, "
                           f"not {self.pair_limit!r} on {self.granularity}")
        if self.granularity == "tensor" and (self.axis is not None or self.block_size is not None):
            raise SfcError("a per-tensor quantizer takes neither axis nor block_size")
        if self.granularity == "channel":
            if self.axis is None:
                raise SfcError("a per-channel quantizer needs an axis")
            if self.block_size is not None:
                raise SfcError("a per-channel quantizer takes no block_size")
        if self.granularity == "block":
            if self.axis is None:
                raise SfcError("a block quantizer needs an axis")
            bs = self.block_size
            if bs is None or not _is_int(bs) or bs < _MIN_BLOCK or bs & (bs - 1):
                raise SfcError(
                    f"a block quantizer needs block_size a power of two >= {_MIN_BLOCK}, not {bs!r}"
                )
        if not isinstance(self.zero_point, bool) or (
                self.zero_point and (self.granularity != "block" or self.bits == 8)):
            raise SfcError(f"zero points are for 4/2-bit block quantizers, not "
                           f"{self.zero_point!r} on INT{self.bits} {self.granularity}")
        if self.scale_bits not in SCALE_BITS or not _is_int(self.scale_bits) or (
                self.scale_bits != 32 and self.granularity != "block"):
            raise SfcError(f"scale_bits must be 32, or 16 or 8 on a block quantizer, not "
                           f"{self.scale_bits!r} on {self.granularity}")

    @property
    def qmin(self) -> int:
        """Smallest integer value (-2^(bits-1))."""
        return INT_RANGES[self.bits][0]

    @property
    def qmax(self) -> int:
        """Largest integer value (2^(bits-1) - 1); absmax scales map |x|max onto it."""
        return INT_RANGES[self.bits][1]

    @property
    def span(self) -> int:
        """How far apart a block's carried integers may lie (qmax - qmin with a zero point,
        else the range itself)."""
        return self.qmax - self.qmin

    @property
    def int_bounds(self) -> tuple[int, int]:
        """The range of the integers sfc carries: (qmin, qmax), or (-span, span) for
        zero-point specs (q - z with q and z both in range)."""
        return (-self.span, self.span) if self.zero_point else (self.qmin, self.qmax)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (every key, None where unused; `zero_point` only when set, so recipes
        of symmetric builds keep their earlier bytes)."""
        data: dict[str, Any] = {
            "bits": self.bits,
            "granularity": self.granularity,
            "axis": self.axis,
            "block_size": self.block_size,
            "pair_limit": self.pair_limit,
        }
        if self.zero_point:
            data["zero_point"] = True
        if self.scale_bits != 32:
            data["scale_bits"] = self.scale_bits
        return data

    @classmethod
    def from_dict(cls, data: Any) -> QuantSpec:
        """Inverse of `to_dict` (recipes without `pair_limit` predate it: no limit);
        malformed input raises SfcError."""
        keys = {"bits", "granularity", "axis", "block_size"}
        optional = {"pair_limit", "zero_point", "scale_bits"}
        if not isinstance(data, dict) or not keys <= set(data) <= keys | optional:
            raise SfcError(f"malformed quantizer spec: {data!r}")
        return cls(data["bits"], data["granularity"], data["axis"], data["block_size"],
                   data.get("pair_limit"), data.get("zero_point", False),
                   data.get("scale_bits", 32))

    def describe(self) -> str:
        """Short human form, e.g. 'INT4 block(axis 0, 32)'."""
        narrow = f", pairs <= {self.pair_limit}" if self.pair_limit else ""
        if self.granularity == "tensor":
            return f"INT{self.bits} per-tensor{narrow}"
        if self.granularity == "channel":
            return f"INT{self.bits} per-channel(axis {self.axis}{narrow})"
        zero = ", zero points" if self.zero_point else ""
        half = {32: "", 16: ", float16 scales", 8: ", 8-bit scale codes"}[self.scale_bits]
        return f"INT{self.bits} block(axis {self.axis}, {self.block_size}{zero}{half})"


def min_opset(spec: QuantSpec) -> int:
    """The lowest default-domain opset whose DequantizeLinear can express `spec`.

    13: per-axis INT8. 21: INT4 types and the `block_size` attribute. 25: INT2 types.
    """
    if spec.bits == 2:
        return 25
    if spec.bits == 4 or spec.granularity == "block":
        return 21
    return 13


@dataclass(frozen=True)
class TargetCaps:
    """What a target runs natively; placement rules read these, never the target's name.

    `block_weight_ops`: op types whose weight may be block-quantized (sub-8-bit).
    `block_weight_only`: block-quantized weight ops take float activations (no
    activation Q/DQ in front of them). True for ORT CPU, whose DQ->MatMulNBits fusion
    requires the MatMul's only DQ input to be the weight (MatMulNBits quantizes
    activations itself at accuracy_level 4), and for TensorRT, whose INT4 is W4A16.
    `max_opset`: the highest default-domain opset the runtime loads.
    `block_last_dim_multiple`: (bits, m) pairs: block-quantized weights of `bits` bits
    need their last dimension (MatMul's N) to be a multiple of m.
    `plugin_weight_bits`: bit-widths the target runs only through a plugin that replaces a
    DQ -> MatMul pair, so such a weight must be read by MatMuls (as their weight) alone.
    `int8_weight_pair_limit`: INT8 weights keep |q[2k]| + |q[2k+1]| along K within this
    (None: no limit). x86 CPUs without VNNI run ORT's u8 x s8 GEMMs with vpmaddubsw, which
    adds the products of K-adjacent pairs in a saturating int16: 255 * (127 + 127)
    overflows it, 255 * 128 does not. Limiting those pairs (measured: pairs 2k, 2k+1 from
    k = 0) is exact there; sizing each channel's scale for its largest pair
    (`weight_scales`) gives a finer step than 7-bit weights (ONNX Runtime's
    `reduce_range`).
    `gather_copy_int8`: the runtime's Gather has no 4/2-bit kernel, so a Gather reading a
    block-quantized weight (a tied embedding table) runs on an INT8 copy anyway; the plan
    gives the Gathers their own INT8 copy, quantized from the float weights
    (`Quantizer.gather_spec`), instead of letting lowering re-round the block integers.
    `block_zero_point`: block-quantized weights may carry a zero point per block
    (`QuantSpec.zero_point`); ONNX Runtime fuses DQ with INT4/INT2 zero points into
    MatMulNBits, TensorRT takes only symmetric weights.
    """

    name: str
    weight_bits: frozenset[int]
    activation_bits: frozenset[int]
    block_weight_ops: frozenset[str]
    max_opset: int
    block_weight_only: bool = True
    block_last_dim_multiple: tuple[tuple[int, int], ...] = ()
    plugin_weight_bits: frozenset[int] = frozenset()
    int8_weight_pair_limit: int | None = None
    gather_copy_int8: bool = False
    block_zero_point: bool = False

    def last_dim_multiple(self, bits: int) -> int:
        """What the last dimension of a `bits`-bit block-quantized weight must divide by."""
        return dict(self.block_last_dim_multiple).get(bits, 1)

    def __post_init__(self) -> None:
        if not self.name:
            raise SfcError("target capabilities need a name")
        for label, bits in (("weight", self.weight_bits), ("activation", self.activation_bits)):
            if not isinstance(bits, frozenset) or not bits <= set(INT_RANGES):
                raise SfcError(f"{self.name}: {label}_bits must be a frozenset of 2, 4, 8")
        if not isinstance(self.block_weight_ops, frozenset):
            raise SfcError(f"{self.name}: block_weight_ops must be a frozenset of op types")
        if not _is_int(self.max_opset) or self.max_opset < 13:
            raise SfcError(f"{self.name}: max_opset must be an int >= 13 (per-axis Q/DQ)")
        if not all(
            isinstance(p, tuple) and len(p) == 2 and all(_is_int(v) and v > 0 for v in p)
            for p in self.block_last_dim_multiple
        ):
            raise SfcError(f"{self.name}: block_last_dim_multiple must hold (bits, m) int pairs")


# onnxruntime 1.31 CPU: DQ of INT8/INT4/INT2, per-channel and block-wise, all run; block
# DQ + MatMul fuses into com.microsoft.MatMulNBits (bits 2/4/8); activations INT8 only
# (INT16 activations are not fused). Gemm and Conv have no block-weight kernel.
# INT2 needs N % 4 == 0: onnxruntime 1.31's DQ -> MatMulNBits fusion of INT2 weights
# computes wrong results otherwise (measured for K 32..64, N 29..41; the unfused DQ and
# INT4 are right), so placement falls back to INT8 there.
ORT_CPU_CAPS = TargetCaps(
    name="ort-cpu",
    weight_bits=frozenset({2, 4, 8}),
    activation_bits=frozenset({8}),
    block_weight_ops=frozenset({"MatMul"}),
    max_opset=25,
    block_last_dim_multiple=((2, 4),),
    gather_copy_int8=True,
    block_zero_point=True,
)

# ORT CPU on an x86 CPU without VNNI (AVX2, or AVX-512 without VNNI): INT8 weight pairs
# along K limited to 128 in magnitude.
ORT_CPU_SATURATING_CAPS = replace(ORT_CPU_CAPS, name="ort-cpu:avx2", int8_weight_pair_limit=128)

# The `sim` target (fake quantization in ORT): every bit-width the QDQ writer emits, 4-bit
# activations included, and block weights together with quantized activations (W4A8,
# W4A4), since nothing has to fuse. INT2 keeps N % 4 == 0: with float activations ORT would
# still fuse the block DQ into MatMulNBits and hit the bug above.
SIM_CAPS = TargetCaps(
    name="sim",
    weight_bits=frozenset({2, 4, 8}),
    activation_bits=frozenset({4, 8}),
    block_weight_ops=frozenset({"MatMul"}),
    max_opset=25,
    block_weight_only=False,
    block_last_dim_multiple=((2, 4),),
    block_zero_point=True,
)

# TensorRT >= 10 (../shared/guide/tensorrt.md): INT8 per-tensor activations and per-channel
# weights; INT4 block weights are weight-only (W4A16) and need an even last dim; INT2 has no
# TensorRT type, so its block weights become sfc's W2A16 plugin node at lowering
# (sfc.targets.trt_rewrites; N % 4 == 0 keeps every packed byte inside one row).
TENSORRT_CAPS = TargetCaps(
    name="tensorrt",
    weight_bits=frozenset({2, 4, 8}),
    activation_bits=frozenset({8}),
    block_weight_ops=frozenset({"MatMul"}),
    max_opset=25,
    block_weight_only=True,
    block_last_dim_multiple=((4, 2), (2, 4)),
    plugin_weight_bits=frozenset({2}),
)
