"""Word error rate and its uncertainty: pure functions over error counts.

Corpus WER is error-weighted (total errors / total reference words), never a mean of
per-utterance WERs, so long utterances count for more. Confidence intervals come from
bootstrap resampling of utterances (the unit that varies between test sets).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import jiwer
import numpy as np
import numpy.typing as npt

from ..errors import SfcError
from .normalize import normalize_text

# Resampling draws an (n_resamples, n_utterances) index matrix; chunking bounds its size
# to about this many elements so large test sets fit on small devices.
_MAX_CHUNK_ELEMENTS = 2_000_000


@dataclass(frozen=True)
class ErrorCounts:
    """Word-level edit counts of one hypothesis against one reference."""

    substitutions: int
    deletions: int
    insertions: int
    ref_words: int

    @property
    def errors(self) -> int:
        """Total word errors: substitutions + deletions + insertions."""
        return self.substitutions + self.deletions + self.insertions


@dataclass(frozen=True)
class PairedDelta:
    """WER difference of system B minus system A on the same utterances."""

    delta: float
    lo: float
    hi: float
    p_value: float

    @property
    def includes_zero(self) -> bool:
        """Whether the interval contains 0, i.e. no detectable difference."""
        return self.lo <= 0.0 <= self.hi


def count_errors(reference: str, hypothesis: str) -> ErrorCounts:
    """Count substitutions, deletions and insertions after normalising both texts."""
    ref = normalize_text(reference).split()
    hyp = normalize_text(hypothesis).split()
    # jiwer's behaviour on empty inputs has changed between versions; decide here.
    if not ref:
        return ErrorCounts(0, 0, len(hyp), 0)
    if not hyp:
        return ErrorCounts(0, len(ref), 0, len(ref))
    out = jiwer.process_words(" ".join(ref), " ".join(hyp))
    return ErrorCounts(
        substitutions=int(out.substitutions),
        deletions=int(out.deletions),
        insertions=int(out.insertions),
        ref_words=len(ref),
    )


class Counted(Protocol):
    """Anything with an error total and a reference word count (ErrorCounts, results)."""

    @property
    def errors(self) -> int: ...

    @property
    def ref_words(self) -> int: ...


def _ratio(errors: int | float, ref_words: int | float) -> float:
    # With no reference words WER is undefined; 0 errors is perfect, any error unbounded.
    if ref_words == 0:
        return 0.0 if errors == 0 else float("inf")
    return float(errors) / float(ref_words)


def corpus_wer(counts: Iterable[Counted]) -> float:
    """Error-weighted corpus WER: sum of errors / sum of reference words.

    Returns 0.0 when there are neither reference words nor errors and ``inf`` when there
    are errors but no reference words.
    """
    errors = 0
    ref_words = 0
    for c in counts:
        errors += c.errors
        ref_words += c.ref_words
    return _ratio(errors, ref_words)


def _as_1d(name: str, values: npt.ArrayLike) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise SfcError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise SfcError(f"{name} is empty: no utterances to resample")
    return arr


def _check_params(n_resamples: int, level: float) -> None:
    if n_resamples < 1:
        raise SfcError(f"n_resamples must be at least 1, got {n_resamples}")
    if not 0.0 < level < 1.0:
        raise SfcError(f"confidence level must be between 0 and 1, got {level}")


def _resampled_sums(columns: list[np.ndarray], n_resamples: int, seed: int) -> list[np.ndarray]:
    """Sum each column over the same bootstrap resamples of its rows (utterances)."""
    n = columns[0].size
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_CHUNK_ELEMENTS // n)
    sums: list[list[np.ndarray]] = [[] for _ in columns]
    for start in range(0, n_resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_resamples - start), n))
        for acc, col in zip(sums, columns, strict=True):
            acc.append(col[idx].sum(axis=1))
    return [np.concatenate(acc) for acc in sums]


def _interval(stats: np.ndarray, level: float) -> tuple[float, float]:
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bootstrap_ci(
    errors: npt.ArrayLike,
    ref_words: npt.ArrayLike,
    *,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the corpus WER, resampling utterances.

    `errors` and `ref_words` hold one entry per utterance. Resamples that happen to
    contain no reference words carry no WER and are dropped.
    """
    _check_params(n_resamples, level)
    err = _as_1d("errors", errors)
    ref = _as_1d("ref_words", ref_words)
    if err.size != ref.size:
        raise SfcError(f"errors ({err.size}) and ref_words ({ref.size}) differ in length")
    if ref.sum() == 0:
        point = _ratio(err.sum(), 0)
        return point, point

    err_sums, ref_sums = _resampled_sums([err, ref], n_resamples, seed)
    keep = ref_sums > 0
    return _interval(err_sums[keep] / ref_sums[keep], level)


def paired_bootstrap_delta(
    errors_a: npt.ArrayLike,
    errors_b: npt.ArrayLike,
    ref_words: npt.ArrayLike,
    *,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedDelta:
    """Paired bootstrap of WER_b - WER_a over the same utterances.

    Both systems are scored on the same resampled utterances, so per-utterance
    difficulty cancels out. The p-value is two-sided for the null "delta is 0":
    twice the smaller bootstrap tail mass on either side of 0, capped at 1.
    """
    _check_params(n_resamples, level)
    ea = _as_1d("errors_a", errors_a)
    eb = _as_1d("errors_b", errors_b)
    ref = _as_1d("ref_words", ref_words)
    if not ea.size == eb.size == ref.size:
        raise SfcError(
            f"errors_a ({ea.size}), errors_b ({eb.size}) and ref_words ({ref.size}) "
            "differ in length"
        )
    total_ref = ref.sum()
    if total_ref == 0:
        raise SfcError("cannot compare WER: the references contain no words")

    diff = eb - ea
    diff_sums, ref_sums = _resampled_sums([diff, ref], n_resamples, seed)
    keep = ref_sums > 0
    deltas = diff_sums[keep] / ref_sums[keep]
    lo, hi = _interval(deltas, level)
    tail = min(float(np.mean(deltas <= 0.0)), float(np.mean(deltas >= 0.0)))
    return PairedDelta(
        delta=float(diff.sum() / total_ref),
        lo=lo,
        hi=hi,
        p_value=min(1.0, 2.0 * tail),
    )
