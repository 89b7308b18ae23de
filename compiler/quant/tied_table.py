"""GPTQ or MSE rounding for a tied embedding/logits table, decided on held-out inputs.

Whisper's decoder reads its token table twice: a Gather (the embedding) and the last MatMul
(the logits). GPTQ fits that MatMul's rounding to the calibration inputs' Gram matrix, and
the decoder's calibration pass sees few tokens (about 1,600 rows on 100 clips against
K = 384 or 512 features). Measured (BENCHMARKS.md, "whisper-base disagrees"):

- whisper-tiny.en: GPTQ's output error on the half of the clips it did not see is only
  0.88x MSE rounding's (in-sample 0.36x: it overfits), its weight error is 1.5x, and the
  GPTQ table cost 1.20 [0.25, 2.24] WER points against MSE rounding;
- whisper-base: 0.13x held out, and the GPTQ table was 0.87 [-0.13, 2.24] points better.

So `GptqConfig.tied = "auto"` splits the calibration feeds in two (alternate feeds), runs
GPTQ on each half's Gram and measures its layer-output error on the other half, against MSE
rounding's there; GPTQ keeps the table only when the mean ratio is at most
`MAX_HELDOUT_RATIO`. The threshold sits between the two models measured; two models are
all the evidence it has.
"""

from __future__ import annotations

import numpy as np

from .gptq import GptqConfig, GramAccumulator, gptq_quantize
from .spec import QuantSpec
from .weights import dequantize_weight, round_to_nearest

__all__ = ["MAX_HELDOUT_RATIO", "SplitGramAccumulator", "heldout_ratio"]

MAX_HELDOUT_RATIO = 0.5


class SplitGramAccumulator(GramAccumulator):
    """A Gram accumulator that also sums alternate updates (calibration feeds) into two
    halves, for a held-out check; the whole sum is exactly a plain accumulator's."""

    def __init__(self, k: int) -> None:
        super().__init__(k)
        self.halves = (GramAccumulator(k), GramAccumulator(k))
        self._updates = 0

    def update(self, x: np.ndarray) -> None:
        super().update(x)
        self.halves[self._updates % 2].update(x)
        self._updates += 1


def _output_error(delta: np.ndarray, gram: GramAccumulator) -> float:
    from ..precision.probe import output_error  # precision imports quant: not at the top

    return output_error(delta, gram.gram, gram.count)


def heldout_ratio(w: np.ndarray, halves: tuple[GramAccumulator, GramAccumulator],
                  spec: QuantSpec, config: GptqConfig) -> float:
    """GPTQ's layer-output error on held-out inputs over MSE rounding's: GPTQ on each half's
    Gram, both errors measured on the other half, the two ratios averaged. Below 1, GPTQ
    generalizes better than round-to-nearest; near 1, its in-sample gain was overfitting."""
    w = np.asarray(w, np.float32)
    q, scales = round_to_nearest(w, spec, "mse")
    mse_delta = dequantize_weight(q, spec, scales) - w
    ratios = []
    for fit, held in (halves, halves[::-1]):
        q, scales = gptq_quantize(w, fit.gram, fit.count, spec, config)
        gptq_delta = dequantize_weight(q, spec, scales) - w
        ratios.append(_output_error(gptq_delta, held) / max(_output_error(mse_delta, held),
                                                            1e-300))
    return float(np.mean(ratios))
