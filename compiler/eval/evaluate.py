"""Run a transcriber over a manifest and score it.

Only the `transcribe` call is timed: audio decoding is I/O that a deployed system
does differently, and the RTF should describe the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from rich.progress import TextColumn

from ..progress import progress_bar
from .manifest import Utterance
from .results import EvalResult, UtteranceResult, summarize
from .wer import count_errors

if TYPE_CHECKING:
    from ..runtime.whisper import Transcript

SAMPLE_RATE = 16_000


def evaluate(
    transcribe: Callable[[np.ndarray], Transcript | str],
    utterances: Sequence[Utterance],
    *,
    model: str,
    data: str,
    seed: int = 0,
    n_resamples: int = 2000,
    progress: bool = True,
) -> EvalResult:
    """Transcribe every utterance, count word errors and summarise.

    `transcribe` receives float32 16 kHz mono samples and returns text, or sfc's
    `Transcript` (text and loop-guard stops). Audio loading errors (SfcError) and
    transcriber exceptions propagate.
    """
    # Lazy: the audio module pulls in soundfile/scipy, which plain result handling
    # (loading, rendering) does not need.
    from ..runtime.audio import load_audio

    results: list[UtteranceResult] = []
    errors = 0
    ref_words = 0
    with progress_bar(TextColumn("WER {task.fields[wer]}"), enabled=progress) as bar:
        task = bar.add_task("evaluating", total=len(utterances), wer="-")
        for utt in utterances:
            audio = load_audio(utt.audio)
            start = time.perf_counter()
            out = transcribe(audio)
            compute_s = time.perf_counter() - start
            hypothesis = out if isinstance(out, str) else out.text

            counts = count_errors(utt.text, hypothesis)
            results.append(
                UtteranceResult(
                    id=utt.id,
                    voice=utt.voice,
                    condition=utt.condition,
                    reference=utt.text,
                    hypothesis=hypothesis,
                    substitutions=counts.substitutions,
                    deletions=counts.deletions,
                    insertions=counts.insertions,
                    ref_words=counts.ref_words,
                    audio_s=len(audio) / SAMPLE_RATE,
                    compute_s=compute_s,
                    loop_stops=0 if isinstance(out, str) else out.loop_stops,
                )
            )
            errors += counts.errors
            ref_words += counts.ref_words
            running = f"{100.0 * errors / ref_words:.2f}%" if ref_words else "-"
            bar.update(task, advance=1, wer=running)

    return summarize(model, data, results, seed=seed, n_resamples=n_resamples)
