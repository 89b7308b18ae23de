"""The edge Whisper runtime: audio -> log-mel -> encoder -> greedy KV-cached decoder -> text.

Greedy decoding is the default; `options` (`fallback.DecodeOptions`) asks for beam search
and OpenAI's temperature fallback instead (ONNX Runtime decoders only).

Runs an sfc export or build folder with ONNX Runtime, numpy and `tokenizers` only, or its
TensorRT engines (`trt_session`). Audio of at most one window (30 s) is one window,
decoded without timestamps (batched with other recordings, see `WhisperRuntime.limits`).
Longer audio, and any audio asked for timestamps, is decoded with Whisper's timestamp
tokens window after window, each window starting where the last complete segment of the
one before ended (`seek`, as OpenAI's and faster-whisper's decoders do), its text that of
the segments. With voice activity detection (`vad`), the recording is first cut into
stretches of at most 30 s holding its speech regions, cut at pauses, and each stretch is
decoded the same way, stretches decoded together. A stretch's text may not end at a
timestamp while speech the VAD found follows it (`decoding.TimestampRules`): left to
itself, Whisper ended about half the stretches early (77 of 146 on BENCHMARKS.md's long
set, issue 14), and each took a second encoder window for what was left; where its
tokens still stop before that speech, it goes on from there (`seek.complete_segments`).
`seek=False` gives the old consecutive 30 s windows (`features.whisper_windows`), decoded
independently and joined with a space. Segments are placed in the recording's time
(`segments`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from ..card import GraphSpec, ModelCard, WhisperDecoding
from ..errors import SfcError
from .cross import cross_feed
from .decoding import (
    LOOP_GUARD,
    TIME_PRECISION,
    TIMESTAMP_RULES,
    Decoded,
    DecoderStep,
    LoopGuard,
    TimestampRules,
    greedy_decode,
)
from .fallback import GREEDY, DecodeOptions, decode_with_fallback, sampling_rngs
from .features import LogMelSpec, whisper_windows
from .language import Detected, LanguagePlan, detect_language, window_recordings
from .search import Searched, SearchSetup, beam_search, sample
from .seek import SeekWindow, recording_features, seek_decode
from .segments import Segment, map_times, segments_from_tokens, window_clock
from .session import Arena, open_session
from .trt_session import ResidentLoop, TrtSession, open_engine
from .vad import Region, SileroVad, speech_in
from .window import FULL, EncoderWindow

__all__ = ["CACHE", "CrossScratch", "DeviceCacheStep", "OrtStep", "Transcript",
           "WhisperRuntime", "encode_in_chunks"]

# Window time (s) to recording time (s) for one decoding window.
Clock = Callable[[float], float]

# The decoder's outputs that are the next step's cache inputs (sfc's Whisper export).
CACHE = {"present_key": "past_key", "present_value": "past_value"}

# OpenAI's no-speech token: <|nospeech|> (multilingual), <|nocaptions|> (English-only).
NO_SPEECH = ("<|nospeech|>", "<|nocaptions|>")
# A VAD window's text may not end at a timestamp, and its decoding goes on past its tokens'
# last one, only when at least this much of the speech the VAD found follows it: Whisper's
# segment ends fall up to about a second off the speech, so a shorter tail is that, not an
# utterance left out.
SPEECH_LEFT_S = 1.0


def _open(folder: Path, graph: GraphSpec, threads: int | None,
          providers: list[str] | None, arena: Arena, spinning: bool) -> Any:
    """An ORT session, or a TensorRT engine runner for a `.plan` (same `run` interface)."""
    if graph.path.endswith(".plan"):
        return open_engine(folder / graph.path)
    return open_session(folder / graph.path, threads=threads, providers=providers,
                        optimization=graph.optimization, arena=arena, spinning=spinning)


Scratch = Callable[[tuple[int, ...], np.dtype], tuple[np.ndarray, np.ndarray]]


def encode_in_chunks(run: Callable[[np.ndarray], Sequence[np.ndarray]],
                     features: np.ndarray, chunk: int | None,
                     into: Scratch | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cross K/V of windows [B, n_mels, frames], `run` on `chunk` windows at a time.

    `run(windows)` returns (cross_key, cross_value), each [layers, b, heads, frames,
    head_dim]; the chunks' outputs are joined on the batch axis, into the arrays
    `into(shape, dtype)` gives (default: new ones). `chunk` None: one call.
    """
    step = chunk or len(features)
    if len(features) <= step:
        k, v = run(features)[:2]
        return k, v
    first = run(features[:step])
    shape = (first[0].shape[0], len(features), *first[0].shape[2:])
    keys, values = (into(shape, first[0].dtype) if into is not None
                    else (np.empty(shape, first[0].dtype), np.empty(shape, first[0].dtype)))
    for i in range(0, len(features), step):
        k, v = first[:2] if i == 0 else run(features[i:i + step])[:2]
        keys[:, i:i + step], values[:, i:i + step] = k, v
    return keys, values


class CrossScratch:
    """Two buffers that a batch's stacked cross K/V are written into, kept from one batch
    to the next: a new array of that size (147 MB for 8 tiny.en windows) takes fresh
    pages from the OS each time; for 7 windows (129 MB) that took 1.3 s on the VM this was
    measured on (it backs pages on first touch) against 0.03 s into pages already held."""

    def __init__(self, rows: int = 1) -> None:
        self.rows = rows  # windows the first buffers hold, at least: the runtime's batch
        self._flat: tuple[np.ndarray, np.ndarray] | None = None

    def __call__(self, shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        size = int(np.prod(shape))
        if self._flat is None or self._flat[0].dtype != dtype or self._flat[0].size < size:
            # Sized for `rows` windows at once, so a batch larger than the first does not
            # take fresh pages again.
            room = max(size, size // shape[1] * self.rows)
            self._flat = (np.empty(room, dtype), np.empty(room, dtype))
        return self._flat[0][:size].reshape(shape), self._flat[1][:size].reshape(shape)


@dataclass(frozen=True)
class Transcript:
    """The text of one recording, how many of its windows the loop guard ended, when
    decoded with timestamps its segments (None: decoded without), the language it was
    decoded in (given or detected; "en" on an English-only model; None: no window), and
    the decoding options when not greedy (seed included: the record of a sampled text)."""

    text: str
    loop_stops: int = 0
    segments: tuple[Segment, ...] | None = None
    language: str | None = None
    decoding: DecodeOptions | None = None


@dataclass
class WhisperRuntime:
    """Loaded sessions and tokenizer for one Whisper folder."""

    card: ModelCard
    decoding: WhisperDecoding
    mel: LogMelSpec
    encoder: Any  # ort.InferenceSession or TrtSession
    decoder: Any
    tokenizer: Tokenizer
    max_batch: int = 8
    guard: LoopGuard | None = LOOP_GUARD
    # Windows per ONNX Runtime encoder call; None: the whole batch (a TensorRT engine
    # always takes the whole batch). One on ORT's CPU provider: a batch of 8 windows held
    # 1.17 GB of arena (8 attention maps of 54 MB each, and their neighbours) against
    # 0.40 GB for one, and ran no faster (BENCHMARKS.md, issue 13).
    encoder_batch: int | None = 1
    options: DecodeOptions = GREEDY
    no_speech: int | None = None  # the no-speech token's id (temperature fallback)
    window: EncoderWindow = FULL  # the encoder's window for recordings of one window
    # Where `_decode` stacks a batch's cross K/V: valid until its next batch.
    scratch: CrossScratch = field(default_factory=CrossScratch, repr=False)

    @classmethod
    def open(cls, folder: str | Path, *, threads: int | None = None,
             guard: LoopGuard | None = LOOP_GUARD,
             providers: list[str] | None = None, arena: Arena = True,
             options: DecodeOptions = GREEDY, spinning: bool = False,
             window: EncoderWindow = FULL) -> WhisperRuntime:
        """Open an export or build folder (its `card.json` says which file is which).

        `providers`: ONNX Runtime execution providers for `.onnx` graphs (default CPU);
        `arena`: ORT's CPU memory arena (`session.session_options`); `options`: greedy
        decoding, or beam search and temperature fallback; `spinning`: ORT's idle worker
        threads spin (off by default: the encoder's and the decoder's pools take turns;
        on a 2-core AMX Xeon (VNNI class) transcription ran 1-3% faster without it over all
        350 eval clips, and 8-9% on 40 clips in one process; BENCHMARKS.md, issue 13);
        `window`: the encoder's window for a recording of at most one window
        (`window.EncoderWindow`; ONNX Runtime encoders of sfc's export format 3 or later).
        """
        folder = Path(folder)
        card = ModelCard.load(folder)
        if card.family != "whisper" or card.decoding is None or card.tokenizer is None:
            raise SfcError(f"{folder} holds a {card.family!r} model; transcription needs Whisper")
        for key in ("encoder", "decoder"):
            if key not in card.graphs:
                raise SfcError(f"{folder}/card.json names no {key} graph")
        tok_path = folder / card.tokenizer
        if not tok_path.is_file():
            raise SfcError(f"tokenizer file not found: {tok_path}")
        if window.fit:
            _check_short_windows(folder, card.graphs["encoder"])
        tokenizer = Tokenizer.from_file(str(tok_path))
        return cls(
            card=card,
            decoding=card.decoding,
            mel=LogMelSpec.from_dict(card.preprocessing or {}),
            encoder=_open(folder, card.graphs["encoder"], threads, providers, arena, spinning),
            decoder=_open(folder, card.graphs["decoder"], threads, providers, arena, spinning),
            tokenizer=tokenizer,
            guard=guard,
            encoder_batch=1 if providers in (None, ["CPUExecutionProvider"]) else None,
            options=options,
            no_speech=next((i for i in map(tokenizer.token_to_id, NO_SPEECH)
                            if i is not None), None),
            window=window,
        )

    def limits(self) -> tuple[int, int | None]:
        """(windows per batch, most new tokens per window) the runtime sends.

        The one place the runtime's batching meets the engines' optimisation profiles: a
        TensorRT engine accepts only the shapes its profile was built for (`sfc build
        --max-batch`, default 1 to spare edge memory; `--max-decoder-steps`), an ORT
        session any. Reading the limits from the engines rather than assuming them keeps
        every engine usable: one built for batch 1 decodes long audio a window at a time.
        """
        batch, tokens = self.max_batch, None
        if isinstance(self.encoder, TrtSession):
            batch = min(batch, self.encoder.profile_max("input_features")[0])
        if isinstance(self.decoder, TrtSession):
            batch = min(batch, self.decoder.profile_max("tokens")[0])
            # Step i > 0 reads a cache of prompt + i - 1 positions (step 0 reads none).
            past = self.decoder.profile_max("past_key")[3]
            tokens = past - len(self.decoding.prompt) + 2
        return batch, tokens

    def encode(self, features: np.ndarray, into: Scratch | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Run the encoder on [B, n_mels, frames]; return the cross-attention K and V
        (stacked into the arrays `into` gives, if any: see `encode_in_chunks`)."""
        return encode_in_chunks(
            lambda chunk: self.encoder.run(["cross_key", "cross_value"],
                                           {"input_features": chunk}),
            features, None if isinstance(self.encoder, TrtSession) else self.encoder_batch,
            into)

    def cross_feed(self, cross_k: np.ndarray, cross_v: np.ndarray) -> dict[str, np.ndarray]:
        """The decoder's cross-attention inputs for the encoder's stacked K/V."""
        return cross_feed({t.name for t in self.card.graphs["decoder"].inputs}, cross_k, cross_v)

    def step_fn(self, cross_k: np.ndarray, cross_v: np.ndarray,
                narrowing: bool = False) -> DecoderStep:
        """A decoder step with this utterance's cross-attention K/V bound.

        On a TensorRT engine the K/V cache stays on the device (`DeviceCacheStep`); an ORT
        session gets and returns it as arrays. `narrowing`: an ORT step that `greedy_decode`
        may shrink to its unfinished rows by moving rows of `cross_k` / `cross_v` in place
        (`OrtStep`), so only for arrays nothing reads after the decode.
        """
        if isinstance(self.decoder, TrtSession):
            return DeviceCacheStep(self.decoder, self.cross_feed(cross_k, cross_v))
        step = OrtStep(self.decoder, cross_k, cross_v,
                       {t.name for t in self.card.graphs["decoder"].inputs})
        return step if narrowing else step.__call__  # a bound method has no `keep`

    def decode_windows(self, windows: np.ndarray, timestamps: bool = False,
                       plan: LanguagePlan | None = None,
                       recordings: Sequence[int] | None = None) -> list[Transcript]:
        """Transcribe encoder inputs [W, n_mels, frames], in batches `limits` allows.

        With `timestamps`, each window's segments are in window time (seconds from its
        start) and its text is theirs, joined. `plan`: language and task (default: a
        multilingual model's language detected, English transcription otherwise);
        `recordings[i]`: the recording of window i, whose language is detected on its
        first window (default: every window on its own).
        """
        plan = plan or LanguagePlan(self.decoding, None)
        owners = range(len(windows)) if recordings is None else recordings
        out: list[Transcript] = []
        size, new_tokens = self.limits()
        for start in range(0, len(windows), size):
            rows = owners[start : start + size]
            dec = self._decode(windows[start : start + size], timestamps, new_tokens, plan,
                               rows)
            for k, (seq, looped, r) in enumerate(zip(dec.ids, dec.looped, rows, strict=True)):
                language = plan.language_of(r)
                if timestamps:
                    segments = segments_from_tokens(
                        seq, self.decoding.timestamp_begin, self.mel.chunk_length_s,
                        self._text, None if dec.quality is None else dec.quality[k])
                    out.append(Transcript(" ".join(s.text for s in segments), int(looped),
                                          tuple(segments), language))
                else:
                    out.append(Transcript(self._text(seq), int(looped), language=language))
        return out

    def _decode(self, windows: np.ndarray, timestamps: bool, new_tokens: int | None,
                plan: LanguagePlan, recordings: Sequence[int],
                speech_after: Sequence[Callable[[int], bool] | None] | None = None,
                ) -> Decoded:
        """Decoding of one batch of windows [B, n_mels, frames], window b of recording
        `recordings[b]`, in the languages and task of `plan`: greedy, or by `options`.
        `speech_after[b]`: whether speech is known to follow a frame of window b (VAD
        windows): its text may not end at a timestamp there (`TimestampRules`)."""
        # The K/V are dead once this batch is decoded, so the next batch reuses their pages.
        self.scratch.rows = self.max_batch
        cross_k, cross_v = self.encode(windows, self.scratch)
        step = self.step_fn(cross_k, cross_v, narrowing=self.options.greedy)
        languages = plan.batch(step, recordings)
        opts = self.options
        per_s = self.mel.sample_rate / self.mel.hop_length
        after_s = [None if f is None else (lambda t, f=f: f(round(t * per_s)))
                   for f in speech_after or [None] * len(windows)]

        def rules(rows: Sequence[int], group: int) -> TimestampRules | None:
            # The rules of `group` adjacent decoder rows per window of `rows`.
            if not timestamps:
                return None
            if not any(after_s):
                return TIMESTAMP_RULES
            return replace(TIMESTAMP_RULES,
                           speech_after=tuple(after_s[r] for r in rows for _ in range(group)))

        if opts.greedy:
            return greedy_decode(step, self.decoding, len(windows),
                                 max_new_tokens=new_tokens, guard=self.guard,
                                 timestamps=rules(range(len(windows)), 1),
                                 languages=languages, task=plan.task)
        if isinstance(self.decoder, TrtSession):
            raise SfcError("beam search and temperature fallback need an ONNX Runtime "
                           "decoder; this folder's is a TensorRT engine (decode greedily)")

        def search(rows: list[int], temperature: float) -> Searched:
            # Each window's cross K/V repeated once per beam (or sample), rows adjacent.
            group = opts.beam_size if temperature == 0 else opts.best_of
            pick = np.repeat(np.asarray(rows), group)
            sub = self.step_fn(cross_k[:, pick], cross_v[:, pick])
            setup = SearchSetup(self.decoding, new_tokens, self.guard, rules(rows, group),
                                [languages[r] for r in rows], plan.task, self.no_speech,
                                opts.length_penalty)
            if temperature == 0:
                return beam_search(sub, setup, len(rows), group, opts.patience)
            rngs = [g for r in rows
                    for g in sampling_rngs(opts.seed, windows[r], temperature, group)]
            return sample(sub, setup, len(rows), temperature, rngs)

        return decode_with_fallback(search, len(windows), self._text, opts)

    def detect_language(self, audio: np.ndarray) -> Detected:
        """The language spoken in 16 kHz mono float32 audio, detected on its first window
        (multilingual models; an English-only one raises SfcError)."""
        cross_k, cross_v = self.encode(whisper_windows(audio, self.mel)[:1])
        return detect_language(self.step_fn(cross_k, cross_v), self.decoding, 1)[0]

    def _text(self, ids: list[int]) -> str:
        """The text of token ids; special tokens dropped, timestamps unknown to it too."""
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def transcribe(self, audio: np.ndarray, timestamps: bool = False,
                   vad: SileroVad | None = None, seek: bool | None = None,
                   language: str | None = None, task: str = "transcribe") -> Transcript:
        """Text (and with `timestamps` segments) of 16 kHz mono float32 audio of any length;
        with `vad`, decoded in windows of its speech; `seek`: see `transcribe_many`."""
        return self.transcribe_many([audio], timestamps, vad, seek, language, task)[0]

    def transcribe_many(self, audios: Sequence[np.ndarray], timestamps: bool = False,
                        vad: SileroVad | None = None, seek: bool | None = None,
                        language: str | None = None,
                        task: str = "transcribe") -> list[Transcript]:
        """Texts of several recordings, their windows decoded together (throughput mode).

        The windows of all recordings go through `decode_windows` in order, so the decoder
        steps several rows at once (`limits` sets how many). A row's tokens depend only on
        its own window: a recording's text is the one `transcribe` gives it alone, up to the
        float rounding of batched kernels. Windows are consecutive 30 s stretches, or with
        `vad` its windows: stretches of speech regions and the pauses between them, the
        silence between windows skipped (a recording with no speech gets empty text).
        With `timestamps`, each window's segments are moved into the recording's time by
        the window's clock and clamped to its audio. VAD windows are decoded with
        timestamps, by `seek` inside each one: Whisper often ends a window's tokens an
        utterance early, and that utterance is decoded in a window of its own (without it,
        21.5% WER against 14.6% on BENCHMARKS.md's long-audio set, nearly all deletions).

        `seek`: decode each recording window after window with timestamps, each window
        starting at the end of the last complete segment of the one before (`seek`); the
        next windows of several recordings are decoded together. Default, without `vad`:
        with `timestamps`, and for recordings longer than one window, as OpenAI's and
        faster-whisper's decoders do (consecutive windows lose the words a window cuts:
        43% WER against 15% on BENCHMARKS.md's long-audio set). Decided per recording, so a
        recording's text does not depend on what it is batched with.

        `language` (a code such as "de") and `task` ("transcribe", or "translate" into
        English) on a multilingual model; without `language` each recording's is detected
        on its first window. An English-only model takes "en" and "transcribe" only.
        """
        plan = LanguagePlan(self.decoding, language, task)  # bad options fail here
        if seek and vad is not None:
            raise SfcError("seek and VAD windows are two ways of cutting long audio; "
                           "choose one")
        if vad is not None:
            return self._seek_many(audios, timestamps, plan, vad)
        chosen = [seek if seek is not None else timestamps or len(a) > self.mel.n_samples
                  for a in audios]
        if any(chosen):
            picks = [i for i, c in enumerate(chosen) if c]
            rest = [i for i, c in enumerate(chosen) if not c]
            done = dict(zip(picks, self._seek_many([audios[i] for i in picks], timestamps,
                                                   plan), strict=True))
            if rest:
                done.update(zip(rest, self.transcribe_many([audios[i] for i in rest],
                                                           timestamps, None, False, language,
                                                           task), strict=True))
            return [done[i] for i in range(len(audios))]
        planned = [self._fixed_windows(a) for a in audios]
        # Recordings of one window may be encoded on a shorter one (`window`); windows of
        # one size are decoded together, and a recording's text does not depend on which
        # others share its batch.
        sizes = [self.mel.n_frames if timestamps or len(f) > 1
                 else self.window.frames(len(a), self.mel)
                 for a, (f, _) in zip(audios, planned, strict=True)]
        owners = window_recordings([len(f) for f, _ in planned])
        decoded: dict[int, Transcript] = {}
        for size in sorted(set(sizes), reverse=True):
            picks = [w for w, r in enumerate(owners) if sizes[r] == size]
            windows = np.concatenate([planned[r][0] for r in dict.fromkeys(owners[w]
                                                                           for w in picks)])
            for w, got in zip(picks, self.decode_windows(
                    np.ascontiguousarray(windows[:, :, :size]), timestamps, plan,
                    [owners[w] for w in picks]), strict=True):
                decoded[w] = got
        out = []
        for r, (_, clocks) in enumerate(planned):
            mine = [decoded[w] for w, owner in enumerate(owners) if owner == r]
            out.append(Transcript(
                " ".join(w.text for w in mine if w.text), sum(w.loop_stops for w in mine),
                _in_recording(mine, clocks) if timestamps else None, plan.language_of(r),
                self._recorded()))
        return out

    def _seek_many(self, audios: Sequence[np.ndarray], timestamps: bool,
                   plan: LanguagePlan, vad: SileroVad | None = None) -> list[Transcript]:
        """`transcribe_many` by `seek` windows over each recording, or over each of its
        `vad` windows: a recording's segments are its windows' complete ones, its text
        theirs joined (segments returned with `timestamps`)."""
        size, new_tokens = self.limits()
        rate, hop = self.mel.sample_rate, self.mel.hop_length
        # Pieces decoded by seek: whole recordings, or VAD windows (with their speech).
        pieces: list[np.ndarray] = []
        owners: list[int] = []
        offsets: list[float] = []
        speech: list[list[tuple[int, int]]] = []  # each piece's regions, in its frames
        for r, audio in enumerate(audios):
            cuts, regions = vad.plan(audio) if vad else ([Region(0, len(audio))], [])
            for w in cuts:
                pieces.append(recording_features(audio[w.start:w.end], self.mel))
                owners.append(r)
                offsets.append(w.start / rate)
                speech.append([(g.start // hop, g.end // hop) for g in speech_in(w, regions)])
        least = round(SPEECH_LEFT_S * rate / hop)

        def speech_after(piece: int, frame: int) -> bool:
            return sum(max(0, e - max(s, frame)) for s, e in speech[piece]) >= least

        decoded = seek_decode(pieces,
                              lambda windows, rows, afters: self._decode(
                                  windows, True, new_tokens, plan, [owners[i] for i in rows],
                                  afters),
                              self.mel.n_frames, self.decoding.timestamp_begin, size,
                              round(TIME_PRECISION * rate / hop),
                              speech_after if vad else None)
        found: list[list[tuple[SeekWindow, float]]] = [[] for _ in audios]
        for piece, windows in enumerate(decoded):
            found[owners[piece]] += [(w, offsets[piece]) for w in windows]
        out = []
        for r, placed in enumerate(found):
            segments = tuple(s for w, at in placed for s in self._seek_segments(w, at))
            out.append(Transcript(" ".join(s.text for s in segments),
                                  sum(w.looped for w, _ in placed),
                                  segments if timestamps else None, plan.language_of(r),
                                  self._recorded()))
        return out

    def _recorded(self) -> DecodeOptions | None:
        """The options a recording's transcript records: none for greedy decoding."""
        return None if self.options.greedy else self.options

    def _seek_segments(self, window: SeekWindow, offset: float = 0.0) -> list[Segment]:
        """The segments of one `seek` window of a piece starting `offset` seconds into the
        recording, in the recording's time."""
        frame_s = self.mel.hop_length / self.mel.sample_rate
        seconds = window.frames * frame_s
        return map_times(segments_from_tokens(window.ids, self.decoding.timestamp_begin,
                                              seconds, self._text, window.quality),
                         window_clock(offset + window.start * frame_s, seconds))

    def _fixed_windows(self, audio: np.ndarray) -> tuple[np.ndarray, list[Clock]]:
        """Consecutive 30 s windows of `audio` and the clock of each."""
        windows = whisper_windows(audio, self.mel)
        seconds, span = len(audio) / self.mel.sample_rate, self.mel.chunk_length_s
        return windows, [window_clock(i * span, min(span, seconds - i * span))
                         for i in range(len(windows))]


def _check_short_windows(folder: Path, encoder: GraphSpec) -> None:
    """Refuse a shorter encoder window where the encoder cannot take one."""
    if encoder.path.endswith(".plan"):
        raise SfcError(f"{folder}: a TensorRT engine takes the full 30 s window only; "
                       "use --encoder-window full")
    frames = next((t.shape[-1] for t in encoder.inputs if t.name == "input_features"), None)
    if isinstance(frames, int):
        raise SfcError(f"{folder}: its encoder takes {frames} frames only (an export older "
                       "than sfc's format 3); export and build it again for a shorter window")


def _in_recording(windows: Sequence[Transcript],
                  clocks: Sequence[Clock]) -> tuple[Segment, ...]:
    """The windows' segments moved from window time into the recording's."""
    out: list[Segment] = []
    for window, clock in zip(windows, clocks, strict=True):
        out += map_times(window.segments or (), clock)
    return tuple(out)


class OrtStep:
    """A `DecoderStep` on an ONNX Runtime decoder with one batch's cross K/V bound, which
    `keep` narrows to some of its rows (`decoding.Narrowable`).

    The rows kept are moved to the front of the bound arrays in place (one window's K/V is
    18 MB on tiny.en, 37 MB on base; `compacted` moves each row at most once), rather than
    gathered into new arrays: fresh pages are slow on some machines (`CrossScratch`).
    """

    def __init__(self, decoder: Any, cross_k: np.ndarray, cross_v: np.ndarray,
                 inputs: set[str]) -> None:
        self._decoder, self._k, self._v, self._inputs = decoder, cross_k, cross_v, inputs
        self._cross = cross_feed(inputs, cross_k, cross_v)

    def __call__(self, tokens: np.ndarray, past_k: np.ndarray,
                 past_v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        logits, k, v = self._decoder.run(None, {
            "tokens": tokens, "past_key": past_k, "past_value": past_v, **self._cross})
        return logits, k, v

    def keep(self, rows: np.ndarray) -> None:
        """Bind the rows at positions `rows`, in `compacted`'s order (no source row is also
        a destination, so copying in place in any order is safe)."""
        for dst, src in enumerate(rows):
            if src != dst:
                self._k[:, dst] = self._k[:, src]
                self._v[:, dst] = self._v[:, src]
        size = len(rows)
        self._cross = cross_feed(self._inputs, self._k[:, :size], self._v[:, :size])


class DeviceCacheStep:
    """A `DecoderStep` on a TensorRT decoder whose K/V cache never leaves the device.

    The cross-attention K/V are copied in once per decode; each step copies in only the
    tokens and brings back only the logits (`TrtSession.loop`). `greedy_decode` hands a
    step back whatever cache it returned, so the step returns the arrays the decode
    started with as stand-ins: called with them again it continues on the device, called
    with any other cache (a new decode) it starts over from that one.
    """

    def __init__(self, decoder: TrtSession, cross: dict[str, np.ndarray]) -> None:
        self._decoder = decoder
        self._cross = cross
        self._state: tuple[ResidentLoop, np.ndarray, np.ndarray] | None = None  # + start

    def __call__(self, tokens: np.ndarray, past_k: np.ndarray,
                 past_v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Logits [B, T, V] for `tokens`; the cache arguments only say continue or start."""
        if self._state is None or self._state[1] is not past_k or self._state[2] is not past_v:
            loop = self._decoder.loop(
                self._cross, {"past_key": past_k, "past_value": past_v}, CACHE)
            self._state = (loop, past_k, past_v)
        (logits,) = self._state[0].run({"tokens": tokens}, ["logits"])
        return logits, past_k, past_v
