"""How much of Whisper's 30 s window the encoder sees for a clip shorter than it.

Whisper's encoder always takes a 30 s window: a 4 s clip is 4 s of speech and 26 s of
padding, and the encoder's work (linear in the window, quadratic in its attention) is that
of 30 s. `fit` encodes only the clip and a margin of the padding after it (whisper.cpp's
`audio_ctx`, chosen per clip): the first F frames of the 30 s window, exactly what the
model sees there, with positions 0 .. F/2 - 1. The decoder then attends over F/2 positions
instead of 1500. Whisper was trained on 30 s windows only, so transcripts change; the cost
in WER is measured in BENCHMARKS.md (issue 13) and `full` stays the default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import SfcError
from .features import LogMelSpec

__all__ = ["FULL", "EncoderWindow"]

# Seconds of the window's padding kept after the clip, the shortest window, and the step
# windows are rounded up to (clips of similar length share a window size, so they batch
# together).
# On tiny.en's eval clips (3-8 s, FP32) padding of 1, 2, 3 and 5 s cost +7.3, +3.2, +2.5
# and +1.1 WER points (the decoder repeats the clip's text until the window ends); 6, 8 and
# 10 s +0.3 to +0.5, not significant. Over FP32, the default W8A8 build and its fused-
# attention lowering on two sets, 10 s never lost more than 1.2 points where 6 s lost 1.65
# and 2.1 (repetitions again) (BENCHMARKS.md, issue 13).
FIT_PAD_S = 10.0
FIT_LEAST_S = 0.0
FIT_STEP_S = 1.0


@dataclass(frozen=True)
class EncoderWindow:
    """`fit` False: every window is the model's full one. True: a recording of at most one
    window is encoded on its length plus `pad_s`, at least `least_s`, rounded up to
    `step_s`, at most the full window. Recordings longer than one window, and windows
    decoded with timestamps (seek and VAD windows), keep the full window."""

    fit: bool = False
    pad_s: float = FIT_PAD_S
    least_s: float = FIT_LEAST_S
    step_s: float = FIT_STEP_S

    def __post_init__(self) -> None:
        for what, value in (("padding", self.pad_s), ("shortest window", self.least_s)):
            if not (math.isfinite(value) and value >= 0):
                raise SfcError(f"the encoder window's {what} must be >= 0 s, not {value}")
        if not (math.isfinite(self.step_s) and self.step_s > 0):
            raise SfcError(f"the encoder window's step must be > 0 s, not {self.step_s}")

    @classmethod
    def parse(cls, text: str) -> EncoderWindow:
        """`full`, `fit` (the default sizes) or `fit:pad=S,min=S` (either or both)."""
        name, colon, rest = text.strip().partition(":")
        if name == "full" and not colon:
            return cls()
        if name == "fit":
            sizes: dict[str, float] = {}
            try:
                for item in rest.split(",") if colon else []:
                    key, _, value = item.partition("=")
                    sizes[{"pad": "pad_s", "min": "least_s"}[key.strip()]] = float(value)
                return cls(fit=True, **sizes)
            except (KeyError, ValueError):
                pass
        raise SfcError(f"--encoder-window takes full, fit or fit:pad=S,min=S (seconds kept "
                       f"after the clip, shortest window), not {text!r}")

    def __str__(self) -> str:
        if not self.fit:
            return "full"
        sizes = [f"{key}={value:g}" for key, value, default in (
            ("pad", self.pad_s, FIT_PAD_S), ("min", self.least_s, FIT_LEAST_S))
            if value != default]
        return "fit" + (":" + ",".join(sizes) if sizes else "")

    def frames(self, samples: int, spec: LogMelSpec) -> int:
        """Encoder input frames for a recording of `samples` samples: even (the encoder's
        second convolution halves them), at least one step, at most the full window."""
        full = spec.n_frames
        if not self.fit or samples > spec.n_samples:
            return full
        per_s = spec.sample_rate / spec.hop_length
        step = max(2, 2 * round(self.step_s * per_s / 2))
        need = max(samples / spec.sample_rate + self.pad_s, self.least_s) * per_s
        return min(full, step * max(1, math.ceil(need / step - 1e-9)))


FULL = EncoderWindow()
