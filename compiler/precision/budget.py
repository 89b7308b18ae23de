"""What a weight format costs, and the budget a mixed build must meet.

Bits are counted as stored: every integer at its width plus one scale per block or
channel, float32 unless the spec stores float16 block scales (`QuantSpec.scale_bits`; so
INT4 in blocks of 32 costs 5.0 bits per weight, 4.5 with float16 scales, INT8 per-channel
8 + 32/K; ONNX Runtime's MatMulNBits takes its scales in the activations' type, so `ort-cpu`
deploys float16 scales through a Cast that ONNX Runtime folds at load); a zero point per
block adds its integer's width: INT4 in blocks of 32 with zero points costs 5.125 (4.625
with float16 scales, 4.375 + 16/K with 8-bit scale codes and a float16 step per column
of K rows). The average is over the parameters of the weights
the build can quantize (each tensor once, a tied embedding included); weights kept float
count 32 bits. Not counted: the INT8 copy a
Gather reads on a target with `gather_copy_int8` (ONNX Runtime's Gather has no 4/2-bit
kernel, so that copy exists whatever the bits); a build's real bytes include it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import SfcError
from ..quant.spec import QuantSpec
from ..quant.weights import scale_shape

__all__ = ["FLOAT_BITS", "MIN_AVG_BITS", "Budget", "WeightOption", "parse_format",
           "storage_bits"]

FLOAT_BITS = 32
MIN_AVG_BITS = 2.0  # INT2 integers alone; scales make any real build cost more
MAX_AVG_BITS = 8.0


def storage_bits(shape: tuple[int, ...], spec: QuantSpec | None) -> int:
    """Bits one copy of a weight of `shape` takes under `spec` (None: float32)."""
    numel = math.prod(shape)
    if spec is None:
        return numel * FLOAT_BITS
    per_group = spec.scale_bits + (spec.bits if spec.zero_point else 0)  # scale, zero point
    steps = 0
    if spec.scale_bits == 8:  # and one float16 step per column
        assert spec.axis is not None
        steps = 16 * numel // shape[spec.axis]
    return numel * spec.bits + math.prod(scale_shape(shape, spec)) * per_group + steps


def parse_format(text: str) -> tuple[int, int | None]:
    """'8' -> (8, None) (INT8 per-channel); '4/32' -> (4, 32) (INT4, blocks of 32)."""
    bits_text, _, block_text = str(text).strip().partition("/")
    try:
        bits = int(bits_text)
        block = int(block_text) if block_text else None
    except ValueError:
        raise SfcError(f"bad weight format {text!r}: use 8, 4/32, 4/128, 2/32, ...") from None
    if bits not in (8, 4, 2):
        raise SfcError(f"bad weight format {text!r}: bits must be 8, 4 or 2")
    if bits == 8 and block is not None:
        raise SfcError(f"bad weight format {text!r}: 8-bit weights are per-channel (write 8)")
    if bits < 8 and (block is None or block < 16 or block & (block - 1)):
        raise SfcError(f"bad weight format {text!r}: {bits}-bit weights need a power-of-two "
                       "block >= 16, e.g. 4/32")
    return bits, block


@dataclass(frozen=True)
class WeightOption:
    """One way to store one weight: its spec (None: float), bits, and sensitivity."""

    spec: QuantSpec | None
    bits: int
    sensitivity: float = 0.0

    @property
    def label(self) -> str:
        if self.spec is None:
            return "float"
        if self.spec.granularity == "block":
            return f"{self.spec.bits}/{self.spec.block_size}"
        return str(self.spec.bits)


@dataclass(frozen=True)
class Budget:
    """Average weight bits (`avg_bits`) or total model megabytes (`size_mb`, 1 MB = 1e6
    bytes: the quantizable weights as chosen plus every other initializer at its size)."""

    avg_bits: float | None = None
    size_mb: float | None = None

    def __post_init__(self) -> None:
        if (self.avg_bits is None) == (self.size_mb is None):
            raise SfcError("a mixed-precision build needs exactly one budget: --avg-bits or "
                           "--size-mb")
        if self.avg_bits is not None and not (
                isinstance(self.avg_bits, int | float) and math.isfinite(self.avg_bits)
                and MIN_AVG_BITS <= self.avg_bits <= MAX_AVG_BITS):
            raise SfcError(f"--avg-bits must be between {MIN_AVG_BITS:g} and {MAX_AVG_BITS:g} "
                           f"(weights are 2, 4 or 8 bits), not {self.avg_bits!r}")
        if self.size_mb is not None and not (
                isinstance(self.size_mb, int | float) and math.isfinite(self.size_mb)
                and self.size_mb > 0):
            raise SfcError(f"--size-mb must be a positive number, not {self.size_mb!r}")

    def bits_allowed(self, params: int, other_bytes: int) -> float:
        """The most bits the chosen weights may take in all."""
        if self.avg_bits is not None:
            return self.avg_bits * params
        assert self.size_mb is not None
        return (self.size_mb * 1e6 - other_bytes) * 8

    def to_dict(self) -> dict[str, float | None]:
        return {"avg_bits": self.avg_bits, "size_mb": self.size_mb}
