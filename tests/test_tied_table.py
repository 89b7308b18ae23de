"""The held-out check that decides GPTQ or MSE rounding for a tied table (quant.tied_table)."""

from __future__ import annotations

import numpy as np
import pytest

from sfc.quant.gptq import GptqConfig, GramAccumulator
from sfc.quant.spec import QuantSpec
from sfc.quant.tied_table import MAX_HELDOUT_RATIO, SplitGramAccumulator, heldout_ratio

INT4_B32 = QuantSpec(4, "block", axis=0, block_size=32, zero_point=True)


def _inputs(rng: np.random.Generator, rows: int, k: int, mix: np.ndarray) -> np.ndarray:
    return rng.standard_normal((rows, k)) @ mix


def test_split_accumulator_sums_alternate_updates_and_the_whole() -> None:
    rng = np.random.default_rng(0)
    split, plain = SplitGramAccumulator(8), GramAccumulator(8)
    batches = [rng.standard_normal((3, 8)) for _ in range(5)]
    for x in batches:
        split.update(x)
        plain.update(x)
    np.testing.assert_array_equal(split.gram, plain.gram)  # the same sums, same order
    assert split.count == plain.count == 15
    a, b = split.halves
    assert (a.count, b.count) == (9, 6)
    np.testing.assert_allclose(a.gram, sum(x.T @ x for x in batches[0::2]))
    np.testing.assert_allclose(b.gram, sum(x.T @ x for x in batches[1::2]))


@pytest.mark.parametrize(("rows", "keeps_gptq"), [(64, True), (2, False)])
def test_heldout_ratio_tells_generalizing_from_overfitting(rows: int, keeps_gptq: bool) -> None:
    """Correlated inputs (a decaying spectrum, as a layer's inputs have): with 640 rows per
    half GPTQ's gain holds on the other half; with 8 rows per half for 64 features it is
    mostly overfitting, and MSE rounding is about as good held out."""
    rng = np.random.default_rng(0)
    k = 64
    w = rng.standard_normal((k, 96)).astype(np.float32)
    mix = rng.standard_normal((k, k)) * np.exp(-np.arange(k) / 8)[:, None]
    acc = SplitGramAccumulator(k)
    for _ in range(20 if rows == 64 else 8):
        acc.update(_inputs(rng, rows, k, mix))
    ratio = heldout_ratio(w, acc.halves, INT4_B32, GptqConfig())
    assert 0 < ratio < 10
    assert (ratio <= MAX_HELDOUT_RATIO) is keeps_gptq, ratio
    if keeps_gptq:
        assert ratio < 0.25  # measured 0.10: far from the threshold
