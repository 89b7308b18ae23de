"""Sequential GPTQ: each stage of a graph's MatMuls is calibrated on the outputs of the
stages before it, already quantized.

Plain GPTQ sums every layer's Gram matrix X^T X in one pass over the FP32 model, so a
layer compensates its own rounding for inputs it will never see once the layers before it
are quantized. The GPTQ paper quantizes a model block by block, each block fed by the
quantized ones before it, and llm-compressor's "sequential" pipeline does the same (on
whisper-tiny.en it measured +1.25 WER points against +1.77 for its "basic" one-pass
pipeline, BENCHMARKS.md). Here a graph's MatMul inputs are cut, in graph order, into
`stages` contiguous groups; stage 1 uses the FP32 pass's Gram matrices, and every later
stage re-runs the calibration feeds through a copy of the graph whose earlier stages'
weights are replaced by their dequantized integers. Each extra stage costs one more
calibration pass over the graph (activations stay float in these passes).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

from ..errors import SfcError

__all__ = ["stage_groups"]


def stage_groups(inputs: Iterable[str], position: Callable[[str], int],
                 stages: int) -> list[list[str]]:
    """`inputs` (MatMul data inputs) ordered by `position` (their readers' place in the
    graph's topological node order) and cut into min(stages, len) contiguous groups whose
    sizes differ by at most one."""
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise SfcError(f"GPTQ stages must be a positive int, not {stages!r}")
    ordered = sorted(set(inputs), key=lambda name: (position(name), name))
    n = min(stages, len(ordered))
    bounds = [round(i * len(ordered) / n) for i in range(n + 1)] if n else [0]
    return [ordered[a:b] for a, b in itertools.pairwise(bounds)]
