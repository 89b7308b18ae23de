"""Calibration feeds for an ONNX model sfc did not export, inferred from its inputs.

A generic model's feeds are `.npz` files keyed by input name. Without them, a speech
model's inputs are usually recognisable: one takes audio (raw 16 kHz samples
[batch, samples], or Whisper-style log-mel frames [batch, 80|128, frames]), the others a
recurrent state (fed zeros: a fresh stream) or the sample rate (fed 16000). Such a graph
gets its feeds from the clips of a calibration manifest; any input sfc cannot place makes
the whole graph uninferable, with one line saying why and how to pass `.npz` feeds.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..card import TensorSpec
from ..errors import first_line
from ..eval.manifest import MANIFEST_NAME, Utterance, read_manifest
from ..runtime.audio import SAMPLE_RATE, load_audio
from ..runtime.features import LogMelSpec, whisper_windows
from ..runtime.session import session_options
from .feeds import Feed, npz_feeds

__all__ = ["MAX_FEEDS", "FeedSource", "NoFeeds", "feed_source", "infer_feeds"]

# Histograms settle within a few hundred feeds, and a feed may be a 30 s window of a large
# encoder: the cap bounds calibration time. It is spread over the clips (MAX_FEEDS // clips
# chunks from each) because chunks of one clip share its voice and condition.
MAX_FEEDS = 256

# A sample axis is often dynamic in the graph although the model takes one chunk size
# (Silero VAD fails inside an If node on 1024 samples or more), and ONNX cannot say so.
# The FP32 model runs once per candidate, longest first (more context per feed for models
# that take any length), and the first that runs is the chunk size: 1 s, 0.5 s, 0.25 s,
# 0.1 s, then the frames of streaming models (64, 36, 32, 30, 20, 16, 10 ms). 576 is
# Silero VAD v5's 16 kHz window: 512 new samples after 64 of context, which its Python
# wrapper prepends; on 512 alone the graph runs but scored every calibration chunk as
# silence (speech probability < 0.004 on 200 chunks of calibration_data/calib).
SAMPLE_CHUNKS = (16000, 8000, 4000, 1600, 1024, 576, 512, 480, 320, 256, 160)
# Log-mel frames (100 a second): Whisper's 30 s window first, which its encoders require.
MEL_CHUNKS = (3000, 1000, 500, 100)
MEL_BINS = (80, 128)

_RATE = re.compile(r"(^|_)(sr|fs)$|rate$")
_STATE = re.compile(r"state|hidden|^(h|c|hx|cx|h0|c0)$")


@dataclass(frozen=True)
class FeedSource:
    """A graph's calibration feeds: every call of `make` streams the same feeds afresh."""

    description: str  # one line: where the feeds come from
    make: Callable[[], Iterator[Feed]]
    count: int | None  # feeds per stream, when known without reading them (.npz files)


@dataclass(frozen=True)
class NoFeeds:
    """Why no feeds could be found, and how to pass them (one line)."""

    reason: str


@dataclass(frozen=True)
class AudioInput:
    """The input fed from calibration audio."""

    spec: TensorSpec
    n_mels: int | None  # None: raw samples [batch, samples]; else log-mel [batch, n_mels, T]

    @property
    def fixed_length(self) -> int | None:
        """Samples or frames per feed when the graph fixes them."""
        last = self.spec.shape[-1]
        return last if isinstance(last, int) else None

    def shape(self, length: int) -> tuple[int, ...]:
        """One feed's shape (batch 1)."""
        return (1, length) if self.n_mels is None else (1, self.n_mels, length)

    def describe(self, length: int) -> str:
        if self.n_mels is None:
            return f"{self.spec.name} = 16 kHz audio in {length}-sample chunks"
        return f"{self.spec.name} = {self.n_mels}-bin Whisper log-mel in {length}-frame windows"


@dataclass(frozen=True)
class FeedPlan:
    """How every inferred feed of a graph is made."""

    audio: AudioInput
    length: int  # samples or frames per feed
    per_clip: int  # chunks taken from each clip at most
    constants: Mapping[str, np.ndarray]  # state zeros, sample rate
    order: tuple[str, ...]  # the graph's input names, in order


def _how(inputs: Sequence[TensorSpec]) -> str:
    names = ", ".join(t.name for t in inputs)
    return (f"pass calibration feeds with --calib DIR of .npz files, one per feed keyed by "
            f"input name ({names})")


def _no_feeds(why: str, inputs: Sequence[TensorSpec]) -> NoFeeds:
    return NoFeeds(f"{why}; {_how(inputs)}")


def _batch_like(dim: int | str) -> bool:
    return dim == 1 or isinstance(dim, str)


def _kind(spec: TensorSpec) -> str:
    return np.dtype(spec.dtype).kind


def _audio_input(spec: TensorSpec) -> AudioInput | None:
    """`spec` as raw samples [batch, samples] or log-mel [batch, 80|128, frames], if it is."""
    shape = spec.shape
    if _kind(spec) != "f" or not shape or not _batch_like(shape[0]):
        return None
    if len(shape) == 2 and (isinstance(shape[1], str) or shape[1] >= SAMPLE_CHUNKS[-1]):
        return AudioInput(spec, None)
    if len(shape) == 3 and shape[1] in MEL_BINS:
        return AudioInput(spec, int(shape[1]))
    return None


def _constant(spec: TensorSpec) -> np.ndarray | str | None:
    """The fixed value of a sample-rate or recurrent-state input; a reason when its shape
    cannot be filled; None when `spec` is neither."""
    name, kind = spec.name.lower(), _kind(spec)
    if _RATE.search(name) and spec.shape in ((), (1,)) and kind in "iuf":
        return np.full(spec.shape, SAMPLE_RATE, dtype=spec.dtype)
    if _STATE.search(name) and kind == "f":
        # Only a batch axis may be dynamic: any other size would be a guess.
        unknown = [d for d in spec.shape if isinstance(d, str) and "batch" not in d.lower()]
        if unknown:
            return f"state input '{spec.name}' has dynamic axes {unknown} sfc cannot size"
        return np.zeros([d if isinstance(d, int) else 1 for d in spec.shape], spec.dtype)
    return None


def _describe_spec(spec: TensorSpec) -> str:
    return f"'{spec.name}' ({spec.dtype} [{', '.join(map(str, spec.shape))}])"


def _classify(inputs: Sequence[TensorSpec]) -> tuple[AudioInput, dict[str, np.ndarray]] | str:
    """The one audio input and the constants of the others, or why there is none."""
    audio: list[AudioInput] = []
    constants: dict[str, np.ndarray] = {}
    for spec in inputs:
        value = _constant(spec)
        if isinstance(value, str):
            return value
        if value is not None:
            constants[spec.name] = value
            continue
        found = _audio_input(spec)
        if found is None:
            return f"sfc cannot tell what input {_describe_spec(spec)} takes"
        audio.append(found)
    if len(audio) != 1:
        names = ", ".join(f"'{a.spec.name}'" for a in audio)
        return (f"several inputs look like audio ({names})" if audio else
                "no input looks like audio (16 kHz samples [batch, samples] or log-mel "
                "[batch, 80|128, frames])")
    return audio[0], constants


def _probe_length(fp32_model: Path, audio: AudioInput,
                  constants: Mapping[str, np.ndarray]) -> int | str:
    """The longest candidate length the FP32 model runs on, or why none runs."""
    fixed = audio.fixed_length
    candidates = (fixed,) if fixed else SAMPLE_CHUNKS if audio.n_mels is None else MEL_CHUNKS
    options = session_options(arena=False)
    options.log_severity_level = 4  # failing candidates are expected: keep ORT quiet
    error = "no candidate"
    # ORT's error classes share no base but Exception; any failure is an answer here.
    try:
        session = ort.InferenceSession(str(fp32_model), sess_options=options,
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:
        return f"ONNX Runtime cannot load {fp32_model}: {first_line(exc)}"
    dtype = audio.spec.dtype
    for length in candidates:
        feed = {audio.spec.name: np.zeros(audio.shape(length), dtype), **constants}
        try:
            session.run(None, feed)
            return length
        except Exception as exc:
            error = first_line(exc)
    unit = "samples" if audio.n_mels is None else "frames"
    return (f"the FP32 model ran on none of {list(candidates)} {unit} of "
            f"'{audio.spec.name}' ({error})")


def _chunks(x: np.ndarray, size: int, count: int) -> list[np.ndarray]:
    """Up to `count` non-overlapping chunks of `size` along the last axis, one from the
    middle of each of `count` equal parts of `x` (a single chunk is the middle one, not the
    leading silence of a clip); one zero-padded chunk when `x` is shorter than `size`."""
    full = x.shape[-1] // size
    if full == 0:
        pad = [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])]
        return [np.pad(x, pad)]
    take = min(count, full)
    starts = ((2 * i + 1) * full // (2 * take) for i in range(take))
    return [x[..., s * size : (s + 1) * size] for s in starts]


def _log_mel_frames(samples: np.ndarray, n_mels: int) -> np.ndarray:
    """A clip's Whisper log-mel frames [n_mels, frames], without window padding."""
    spec = LogMelSpec(n_mels=n_mels)
    windows = whisper_windows(samples, spec)
    return np.concatenate(list(windows), axis=1)[:, : len(samples) // spec.hop_length]


def _stream(plan: FeedPlan, utterances: Sequence[Utterance]) -> Iterator[Feed]:
    """The plan's feeds, clip by clip: each clip is loaded, cut and dropped in turn."""
    audio, made = plan.audio, 0
    for utt in utterances:
        samples = load_audio(utt.audio)
        x = samples if audio.n_mels is None else _log_mel_frames(samples, audio.n_mels)
        for chunk in _chunks(x, plan.length, plan.per_clip):
            if made == MAX_FEEDS:
                return
            values = {audio.spec.name: chunk[None].astype(audio.spec.dtype), **plan.constants}
            yield {name: values[name] for name in plan.order}
            made += 1


def infer_feeds(fp32_model: Path, inputs: Sequence[TensorSpec], folder: Path,
                limit: int | None = None) -> FeedSource | NoFeeds:
    """Feeds inferred from the graph's `inputs` and the clips of the manifest `folder`
    (the first `limit`), checked by running the FP32 model once; or why there are none."""
    if not (Path(folder) / MANIFEST_NAME).is_file():
        return _no_feeds(f"{folder} holds neither .npz feeds nor a {MANIFEST_NAME} of audio",
                         inputs)
    classified = _classify(inputs)
    if isinstance(classified, str):
        return _no_feeds(classified, inputs)
    audio, constants = classified
    length = _probe_length(Path(fp32_model), audio, constants)
    if isinstance(length, str):
        return _no_feeds(length, inputs)
    utterances = read_manifest(folder)[:limit]
    per_clip = max(1, MAX_FEEDS // max(1, len(utterances)))
    plan = FeedPlan(audio, length, per_clip, constants, tuple(t.name for t in inputs))
    fixed = "".join(f", {name} = {_describe_value(v)}" for name, v in constants.items())
    description = (f"calibration feeds inferred from {folder} ({len(utterances)} clips, up "
                   f"to {per_clip} chunks each, at most {MAX_FEEDS} feeds): "
                   f"{audio.describe(length)}{fixed}")
    return FeedSource(description, partial(_stream, plan, utterances), None)


def _describe_value(value: np.ndarray) -> str:
    # Constants are a state's zeros or a rate's one value.
    if value.any():
        return str(value.ravel()[0].item())
    return f"zeros [{', '.join(map(str, value.shape))}]"


def feed_source(folder: Path, fp32_model: Path, inputs: Sequence[TensorSpec],
                limit: int | None = None) -> FeedSource | NoFeeds:
    """A graph's calibration feeds from `folder`: its `.npz` files when it has any (the
    first `limit`, sorted by name), else inferred from its manifest (`infer_feeds`)."""
    files = sorted(Path(folder).glob("*.npz"))[:limit]
    if not files:
        return infer_feeds(fp32_model, inputs, folder, limit)
    names = [t.name for t in inputs]
    return FeedSource(f"{len(files)} .npz calibration feeds from {folder}",
                      partial(npz_feeds, folder, names, limit), len(files))
