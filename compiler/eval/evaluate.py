"""Run a transcriber over a manifest and score it.

Only the `transcribe` call is timed: audio decoding is I/O that a deployed system
does differently, and the RTF should describe the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from rich.progress import TextColumn

from ..executor import Executor, InProcess
from ..progress import progress_bar
from .manifest import Utterance
from .results import EvalResult, UtteranceResult, summarize
from .shards import transcribe_one
from .wer import count_errors

if TYPE_CHECKING:
    from ..runtime.whisper import Transcript


def evaluate(
    transcribe: Callable[[np.ndarray], Transcript | str] | None,
    utterances: Sequence[Utterance],
    *,
    model: str,
    data: str,
    seed: int = 0,
    n_resamples: int = 2000,
    progress: bool = True,
    executor: Executor | None = None,
    batch: int = 1,
) -> EvalResult:
    """Transcribe every utterance, count word errors and summarise.

    `transcribe` receives float32 16 kHz mono samples and returns text, or sfc's
    `Transcript` (text and loop-guard stops). `executor`: transcribes the utterances
    instead (`eval.shards.TranscriberSpec` on Ray workers, `eval.shards.Batched` several at
    a time here; `transcribe` unused), results in manifest order. `batch`: the utterances
    per transcription call (`Batched`'s size), recorded in the result. Audio loading
    errors (SfcError) and transcriber exceptions propagate.
    """
    if executor is None:
        if transcribe is None:
            raise ValueError("evaluate needs a transcribe function or an executor")
        run = transcribe
        executor = InProcess(lambda utt: transcribe_one(run, utt))
    results: list[UtteranceResult] = []
    errors = 0
    ref_words = 0
    with progress_bar(TextColumn("WER {task.fields[wer]}"), enabled=progress) as bar:
        task = bar.add_task("evaluating", total=len(utterances), wer="-")
        for utt, out in zip(utterances, executor.evaluate(utterances), strict=True):
            counts = count_errors(utt.text, out.text)
            results.append(
                UtteranceResult(
                    id=utt.id,
                    voice=utt.voice,
                    condition=utt.condition,
                    reference=utt.text,
                    hypothesis=out.text,
                    substitutions=counts.substitutions,
                    deletions=counts.deletions,
                    insertions=counts.insertions,
                    ref_words=counts.ref_words,
                    audio_s=out.audio_s,
                    compute_s=out.compute_s,
                    loop_stops=out.loop_stops,
                )
            )
            errors += counts.errors
            ref_words += counts.ref_words
            running = f"{100.0 * errors / ref_words:.2f}%" if ref_words else "-"
            bar.update(task, advance=1, wer=running)

    return summarize(model, data, results, seed=seed, n_resamples=n_resamples, batch=batch)
