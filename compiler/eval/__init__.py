"""Evaluation: manifests, text normalisation, WER with bootstrap CIs, and results.

Runs on edge devices: nothing here imports torch or transformers.
"""

from .evaluate import evaluate
from .manifest import Utterance, read_manifest
from .normalize import normalize_text
from .results import EvalResult, GroupStats, UtteranceResult, render, summarize
from .wer import (
    ErrorCounts,
    PairedDelta,
    bootstrap_ci,
    corpus_wer,
    count_errors,
    paired_bootstrap_delta,
)

__all__ = [
    "ErrorCounts",
    "EvalResult",
    "GroupStats",
    "PairedDelta",
    "Utterance",
    "UtteranceResult",
    "bootstrap_ci",
    "corpus_wer",
    "count_errors",
    "evaluate",
    "normalize_text",
    "paired_bootstrap_delta",
    "read_manifest",
    "render",
    "summarize",
]
