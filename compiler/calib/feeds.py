"""Calibration inputs: what each graph of a model sees on real data.

Whisper (from the model card): the encoder gets the windows of each calibration
utterance; the decoder gets, per utterance, the FP32 model's own greedy transcript
(prompt included) teacher-forced in one call with an empty cache and the FP32 encoder's
cross-attention K/V — the activations of incremental decoding, in one run. Other models:
one `.npz` file per feed, keyed by input name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from ..errors import SfcError
from ..eval.manifest import Utterance
from ..runtime.audio import load_audio
from ..runtime.decoding import greedy_decode
from ..runtime.features import whisper_windows
from ..runtime.whisper import WhisperRuntime

__all__ = ["Encode", "Feed", "npz_feeds", "whisper_feeds"]

Feed = dict[str, np.ndarray]
# A window [1, n_mels, frames] -> the encoder's (cross_key, cross_value).
Encode = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def whisper_feeds(runtime: WhisperRuntime, utterances: Sequence[Utterance], graph: str,
                  transcripts: dict[str, list[int]] | None = None,
                  encode: Encode | None = None) -> Iterator[Feed]:
    """Yield one feed per utterance for the `encoder` or `decoder` graph of an FP32 runtime.

    Streams: only token ids are kept between utterances, so memory does not grow with the
    set. `transcripts` (audio path -> the runtime's greedy ids) is filled on a first pass and
    read on later ones, which then skip decoding (sequential GPTQ streams the set again).
    `encode`: what makes the decoder's cross K/V from an utterance's window (default: the
    runtime's encoder; the build's calibration passes the encoder's statistics pass).
    """
    if graph not in ("encoder", "decoder"):
        raise SfcError(f"Whisper has no graph {graph!r} (encoder, decoder)")
    spec = runtime.decoding
    for utt in utterances:
        features = whisper_windows(load_audio(utt.audio), runtime.mel)[:1]
        if graph == "encoder":
            yield {"input_features": features}
            continue
        cross_k, cross_v = (encode or runtime.encode)(features)
        key = str(utt.audio)
        if transcripts is not None and key in transcripts:
            ids = transcripts[key]
        else:
            ids = greedy_decode(runtime.step_fn(cross_k, cross_v), spec, 1).ids[0]
            if transcripts is not None:
                transcripts[key] = ids
        tokens = np.asarray([[*spec.prompt, *ids]], dtype=np.int64)
        empty = np.zeros((spec.n_layers, 1, spec.n_heads, 0, spec.head_dim), np.float32)
        yield {"tokens": tokens, "past_key": empty, "past_value": empty,
               **runtime.cross_feed(cross_k, cross_v)}


def npz_feeds(folder: Path, input_names: Sequence[str],
              limit: int | None = None) -> Iterator[Feed]:
    """Yield the `.npz` files of `folder` (sorted by name; the first `limit`), each holding
    every graph input."""
    files = sorted(Path(folder).glob("*.npz"))[:limit]
    if not files:
        raise SfcError(f"{folder} holds no .npz calibration files (one per feed, keyed by "
                       f"input name: {', '.join(input_names)})")
    for path in files:
        with np.load(path) as data:
            missing = [n for n in input_names if n not in data.files]
            if missing:
                raise SfcError(f"{path} lacks inputs {missing}")
            yield {n: data[n] for n in input_names}
