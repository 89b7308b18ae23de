"""Task objectives for ESC: how wrong is the fake-quantized model, given candidate scales.

Every objective is a callable `scales -> float` (lower is better; scales keyed by
`esc.quantizer_key(graph, tensor)`). It holds one ONNX Runtime session per graph, written
once with the tuned scales as graph inputs (`write_qdq(..., scales_as_inputs=...)`), so a
candidate costs one forward pass and never a graph rebuild. Everything FP32 (features,
transcripts, reference logits or outputs) is computed once, up front.

- Whisper (`WhisperObjective`), on the first `samples` calibration utterances (first 30 s
  window each), against the FP32 model's own greedy transcripts (prompt + tokens + eot; no
  labels needed), teacher-forced through the quantized encoder and decoder in batches of
  `BATCH` (decoder: one call per batch with the whole padded sequence and an empty cache,
  as `calib.feeds` does; padding positions are masked out):
  - "teacher-forced": mean token cross-entropy of the transcript tokens;
  - "kl": mean KL(FP32 next-token distribution || quantized one) on the same positions;
  - "distortion": relative L2 distance of the logits to FP32's on those positions.
- Any model (`DistortionObjective`, "distortion"): mean relative L2 distance of every output
  of every graph to FP32's, on the first `samples` `.npz` feeds of each graph.

Every objective is built one way: `objective_spec` computes the FP32 reference into a
picklable `ObjectiveSpec`, whose `make()` opens the sessions; a Ray worker (`sfc.executor`)
makes its own objective from the same spec.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from ..card import ModelCard
from ..errors import SfcError, first_line
from ..quant.qdq import scale_input_name, write_qdq
from ..quant.recipe import Recipe
from ..quant.stored import StoredWeights
from ..quant.weights import Rounded
from ..runtime.cross import cross_feed
from ..runtime.session import session_options, shrinking_run
from ..runtime.whisper import encode_in_chunks
from .esc import quantizer_key
from .inferred_feeds import FeedSource
from .segments import SegmentedSession

__all__ = [
    "BATCH",
    "DistortionObjective",
    "GraphSetup",
    "ObjectiveSpec",
    "ScaledSession",
    "Switch",
    "WhisperObjective",
    "WhisperReference",
    "make_objective",
    "objective_spec",
    "resolve_objective",
    "score",
    "switch_feed",
    "teacher_forcing",
    "whisper_reference",
]

BATCH = 8  # utterances per encoder/decoder call
_SCORE_ROWS = 64  # scored positions per block of the log-softmax (`_row_blocks`)
_MAX_INLINE_BYTES = 2**31 - 1 - 2**20  # protobuf's limit, with a margin
_CARD_OBJECTIVES = {"whisper-teacher-forced": "teacher-forced", "distortion": "distortion"}
_WHISPER_METRICS = ("teacher-forced", "kl", "distortion")
Cross = tuple[np.ndarray, np.ndarray]  # an encoder batch's cross-attention K and V


# What a gate feeds when it is on: (graph input, weight) pairs, dequantized when fed.
Switch = tuple[tuple[str, Rounded], ...]


def switch_feed(switches: Mapping[str, Switch], values: Mapping[str, float]
                ) -> dict[str, np.ndarray]:
    """The weights to feed for gate `values` (gate -> 0 or 1; absent: 0): the FP32
    weights stay where every gate of theirs is 0."""
    out: dict[str, np.ndarray] = {}
    for gate, value in values.items():
        if value == 0:
            continue
        if value != 1:
            raise ValueError(f"probe gate {gate} is 0 or 1, not {value}")
        for name, weight in switches[gate]:
            if name in out:
                raise ValueError(f"two formats of {name} switched on at once")
            out[name] = weight.array()
    return out


@dataclass(frozen=True)
class GraphSetup:
    """One graph as ESC sees it: FP32 model, start recipe, and the tensors it tunes.

    `gates`: other float32 scalar inputs of `model` fed from the same mapping as the
    scales (the activation probes' switches). `switches`: the weight probes' gates, also
    read from that mapping (0 or 1), each feeding probed weights in place of the model's
    overridable ones when on (`precision.probe`). `rewrite`: applied
    to the written QDQ model before the session loads it; the graph inputs it adds must be
    among `gates` (the activation probes' switches). `session_config`: the target's ORT
    session config entries for this graph (`Target.session_config`).
    """

    model: onnx.ModelProto
    recipe: Recipe
    tuned: tuple[str, ...]
    gates: tuple[str, ...] = ()
    stored: StoredWeights | None = None  # the recipe's stored weights (GPTQ)
    rewrite: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None
    session_config: tuple[tuple[str, str], ...] = ()
    switches: Mapping[str, Switch] = field(default_factory=dict)


class ScaledSession:
    """One graph's QDQ model with its tuned activation scales as inputs, prepared once.

    `segmented`: for a setup with gates alone (no tuned scales, no weight switches), the
    graph runs as a `SegmentedSession`: a probe that switches gates off starts at the last
    cut before the first of them, from the value the all-on run left there."""

    def __init__(self, graph: str, setup: GraphSetup, *, threads: int | None = None,
                 optimization: str = "all", release_arena: bool = False,
                 segmented: bool = False) -> None:
        self.graph = graph
        # `release_arena`: ORT's arena gives back its free regions after every run, so the
        # session holds no memory between runs (see `make_objective` for where it pays).
        self._run_options = None
        if release_arena:
            self._run_options = shrinking_run()
        self.inputs = {t: scale_input_name(t) for t in setup.tuned} | {
            g: g for g in setup.gates}
        self.switches = setup.switches
        self._switched: tuple[tuple[str, ...], dict[str, np.ndarray]] = ((), {})
        if segmented and (setup.tuned or setup.switches or not setup.gates):
            raise ValueError("a segmented session takes gates alone")
        qdq = write_qdq(setup.model, setup.recipe, scales_as_inputs=setup.tuned,
                        stored=setup.stored)
        if setup.rewrite is not None:
            qdq = setup.rewrite(qdq)
        # The level the target's artifact runs at: the search sees the deployed numerics.
        # With ORT's arena: without it ESC ran 45% longer for 0.4 GB less peak
        # (BENCHMARKS.md, issue 13). Segments take turns, so their pools do not spin.
        self._threads, self._optimization = threads, optimization
        self._config = setup.session_config
        self._tmps: list[tempfile.TemporaryDirectory[str]] = []
        self.outputs = [o.name for o in qdq.graph.output]
        initializers = {t.name for t in qdq.graph.initializer}
        self.input_names = frozenset(i.name for i in qdq.graph.input
                                     if i.name not in initializers)
        self.segments = None
        # Past 2 GB a model is not handed to ORT as bytes: such a graph runs whole.
        self._segmented = segmented and qdq.ByteSize() <= _MAX_INLINE_BYTES
        if self._segmented:
            self.segments = SegmentedSession(qdq, setup.gates, self._open)
        else:
            source = self._source(qdq)
            del qdq  # the serialized copy is enough: not both at once
            self.session = self._open(source)

    def _source(self, qdq: onnx.ModelProto) -> str | bytes:
        """What ORT loads `qdq` from: its bytes, or a file with external data past 2 GB."""
        if qdq.ByteSize() <= _MAX_INLINE_BYTES:
            return qdq.SerializeToString()
        tmp = tempfile.TemporaryDirectory(prefix="sfc-esc-")
        self._tmps.append(tmp)
        path = Path(tmp.name) / "model.onnx"
        onnx.save_model(qdq, str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location="model.onnx.data")
        return str(path)

    def _open(self, source: str | bytes, optimization: str | None = None,
              save_to: str | None = None, shared_arena: bool = False
              ) -> ort.InferenceSession:
        """A session on `source` with this session's options, at ORT level `optimization`
        (None: the target's), writing ORT's optimized graph to `save_to` if given."""
        options = session_options(threads=self._threads,
                                  optimization=optimization or self._optimization,
                                  config=self._config, spinning=not self._segmented,
                                  arena="shared" if shared_arena else True)
        # ORT warns of every overridable initializer (as it should), and that an optimized
        # graph it writes is for this machine only (it is: it is read back at once).
        if self.switches or save_to is not None:
            options.log_severity_level = 3
        if save_to is not None:
            options.optimized_model_filepath = save_to
        try:
            return ort.InferenceSession(source, sess_options=options,
                                        providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT's opaque classes
            raise SfcError(f"ONNX Runtime cannot load the ESC model of graph "
                           f"{self.graph!r}: {first_line(exc)}") from None

    def scale_feed(self, scales: Mapping[str, float]) -> dict[str, np.ndarray]:
        """The scale inputs for `scales` (keyed by quantizer key), and the probed weights
        its switch gates turn on."""
        feed = {name: np.asarray(scales[quantizer_key(self.graph, t)], dtype=np.float32)
                for t, name in self.inputs.items()}
        if self.switches:
            on = tuple(g for g in self.switches if scales[quantizer_key(self.graph, g)])
            if self._switched[0] != on:  # a probe runs several batches on one weight
                # The last mix goes first: a whole mix's weights are a model's worth.
                self._switched = ((), {})
                self._switched = (on, switch_feed(self.switches, {
                    g: scales[quantizer_key(self.graph, g)] for g in self.switches}))
            feed |= self._switched[1]
        return feed

    def run(self, outputs: Sequence[str] | None, feed: Mapping[str, np.ndarray],
            scales: Mapping[str, float]) -> list[np.ndarray]:
        """Run with `feed` plus the scale inputs for `scales`."""
        try:
            if self.segments is not None:
                return self.segments.run(outputs, feed, self.scale_feed(scales))
            result: list[np.ndarray] = self.session.run(
                None if outputs is None else list(outputs), {**feed, **self.scale_feed(scales)},
                self._run_options)
        except Exception as exc:  # ORT's opaque classes
            raise SfcError(f"ONNX Runtime failed on ESC graph {self.graph!r}: "
                           f"{first_line(exc)}") from None
        return result

    def close(self) -> None:
        """Release the session (and its temporary files, for >2 GB models)."""
        self.__dict__.pop("session", None)
        if self.segments is not None:
            self.segments.close()
            self.segments = None
        for tmp in self._tmps:
            tmp.cleanup()
        self._tmps = []


def _rel_l2(ref: np.ndarray, out: np.ndarray) -> float:
    a = np.asarray(ref, np.float64).ravel()
    b = np.asarray(out, np.float64).ravel()
    norm = float(np.linalg.norm(a))
    diff = float(np.linalg.norm(a - b))
    return diff / norm if norm else diff


# ---------------------------------------------------------------- generic: distortion


class DistortionObjective:
    """Mean relative L2 distance of all outputs of all graphs to FP32, on `.npz` feeds."""

    name = "distortion"

    def __init__(self, sessions: Sequence[ScaledSession],
                 feeds: Sequence[Sequence[dict[str, np.ndarray]]],
                 references: Sequence[Sequence[list[np.ndarray]]]) -> None:
        if not sessions or any(not f for f in feeds):
            raise SfcError("the distortion objective needs at least one feed per graph")
        self.sessions, self.feeds, self.references = list(sessions), feeds, references

    def __call__(self, scales: Mapping[str, float]) -> float:
        errors = []
        for session, feeds, refs in zip(self.sessions, self.feeds, self.references,
                                        strict=True):
            for feed, ref in zip(feeds, refs, strict=True):
                outs = session.run(None, feed, scales)
                errors += [_rel_l2(r, o) for r, o in zip(ref, outs, strict=True)]
        return float(np.mean(errors))

    def close(self) -> None:
        for s in self.sessions:
            s.close()


# ---------------------------------------------------------------- Whisper


@dataclass(frozen=True)
class _Batch:
    features: np.ndarray  # [b, n_mels, frames]
    tokens: np.ndarray  # [b, T] prompt + transcript + eot, padded with eot
    mask: np.ndarray  # [b, T - 1] bool: position t predicts tokens[:, t + 1]
    reference: np.ndarray | None  # [n_valid, V] FP32 log-probs (kl) or logits (distortion)


@dataclass(frozen=True)
class WhisperReference:
    """What the FP32 model does on the ESC samples, computed once."""

    batches: tuple[_Batch, ...]
    transcripts: tuple[tuple[int, ...], ...]

    @property
    def tokens(self) -> int:
        """Scored token positions in all."""
        return int(sum(b.mask.sum() for b in self.batches))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float32)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def teacher_forcing(sequences: Sequence[Sequence[int]], prompt_length: int,
                    pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad token sequences (prompt + transcript + eot) into one batch.

    Returns tokens [B, T] (padded with `pad`) and a mask [B, T - 1]: mask[b, t] when the
    logits at position t are scored, i.e. predict a transcript token or eot
    (tokens[b, t + 1], t + 1 >= prompt_length); padding and the prompt are not scored.
    """
    width = max(len(s) for s in sequences)
    tokens = np.full((len(sequences), width), pad, dtype=np.int64)
    mask = np.zeros((len(sequences), max(width - 1, 0)), dtype=bool)
    for i, s in enumerate(sequences):
        tokens[i, : len(s)] = s
        mask[i, prompt_length - 1 : len(s) - 1] = True
    return tokens, mask


def _row_blocks(n: int) -> Iterator[slice]:
    """Row blocks of `_SCORE_ROWS` positions over `n`: a few [rows, V] temporaries at a
    time, not [n, V] (whisper-base, 16 clips: 0.1 GB each). Row-wise arithmetic gives the
    same bits per row whatever the block, so every result is unchanged."""
    return (slice(s, s + _SCORE_ROWS) for s in range(0, n, _SCORE_ROWS))


def score(metric: str, logits: np.ndarray, targets: np.ndarray,
          reference: np.ndarray | None) -> tuple[float, int]:
    """(sum, count) of `metric` over scored positions.

    `logits` [N, V] of the quantized model at the N scored positions, `targets` [N] the
    tokens they should predict, `reference` [N, V] FP32 log-probs ("kl") or logits
    ("distortion"). "distortion" counts one relative L2 distance for the whole block.
    """
    if metric == "distortion":
        assert reference is not None
        return _rel_l2(reference, logits), 1
    if metric != "teacher-forced":
        assert reference is not None
    values = np.empty(len(targets), np.float32)  # per position: log-prob of target or KL
    for rows in _row_blocks(len(targets)):
        logp = _log_softmax(logits[rows])
        if metric == "teacher-forced":
            values[rows] = logp[np.arange(len(logp)), targets[rows]]
        else:
            assert reference is not None
            ref = reference[rows]
            values[rows] = (np.exp(ref) * (ref - logp)).sum(axis=-1)
    total = float(values.astype(np.float64).sum())
    return (-total if metric == "teacher-forced" else total), len(values)


def _log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    """`_log_softmax` of [N, V] logits, block by block (see `_row_blocks`)."""
    out = np.empty(logits.shape, np.float32)
    for rows in _row_blocks(len(logits)):
        out[rows] = _log_softmax(logits[rows])
    return out


def whisper_reference(runtime: Any, utterances: Sequence[Any], metric: str,
                      *, batch: int = BATCH, progress: bool = True,
                      audio: Callable[[int, Any], np.ndarray] | None = None
                      ) -> WhisperReference:
    """FP32 features, greedy transcripts and (for kl / distortion) reference logits.

    `runtime`: an FP32 `WhisperRuntime`; `utterances`: manifest entries (first window of
    each is used); `audio(index, utterance)`: the samples to use instead of the file's
    (augmented training audio).
    """
    from ..progress import progress_bar
    from ..runtime.audio import load_audio
    from ..runtime.decoding import greedy_decode
    from ..runtime.features import whisper_windows

    if metric not in _WHISPER_METRICS:
        raise SfcError(f"unknown Whisper objective {metric!r}")
    if not utterances:
        raise SfcError("ESC needs at least one calibration utterance")
    spec = runtime.decoding
    batches, transcripts = [], []
    bar = progress_bar(enabled=progress, transient=True)
    task = bar.add_task("ESC: FP32 reference transcripts", total=len(utterances))
    with bar:
        for first in range(0, len(utterances), batch):
            chunk = utterances[first:first + batch]
            features = np.concatenate(
                [whisper_windows(load_audio(u.audio) if audio is None else audio(first + i, u),
                                 runtime.mel)[:1] for i, u in enumerate(chunk)])
            cross_k, cross_v = runtime.encode(features)
            ids = greedy_decode(runtime.step_fn(cross_k, cross_v), spec, len(chunk)).ids
            seqs = [[*spec.prompt, *s, spec.eot][: spec.max_target_positions] for s in ids]
            tokens, mask = teacher_forcing(seqs, len(spec.prompt), spec.eot)
            reference = None
            if metric != "teacher-forced":
                empty = np.zeros((spec.n_layers, len(seqs), spec.n_heads, 0, spec.head_dim),
                                 np.float32)
                logits = runtime.decoder.run(["logits"], {
                    "tokens": tokens, "past_key": empty, "past_value": empty,
                    **runtime.cross_feed(cross_k, cross_v)})[0][:, :-1][mask]
                reference = (_log_softmax_rows(logits) if metric == "kl"
                             else logits.astype(np.float32))
            batches.append(_Batch(features, tokens, mask, reference))
            transcripts += [tuple(s) for s in ids]
            bar.advance(task, len(chunk))
    return WhisperReference(tuple(batches), tuple(transcripts))


class WhisperObjective:
    """Teacher-forced error of the fake-quantized encoder + decoder (see the module doc).

    `keep_encoded`: keep the encoder's outputs for the last encoder inputs seen, so probes
    that change only decoder inputs (`precision.probe`, the activation guard) cost a
    decoder pass alone. Without it each batch's outputs go once its decoder pass is done:
    an ESC candidate changes every scale, so they would never be reused, and whisper-base
    holds 0.3 GB of them per batch.
    """

    def __init__(self, metric: str, encoder: ScaledSession, decoder: ScaledSession,
                 reference: WhisperReference, spec: Any, *, keep_encoded: bool = True) -> None:
        if metric not in _WHISPER_METRICS:
            raise SfcError(f"unknown Whisper objective {metric!r}")
        self.name = metric
        self.encoder, self.decoder, self.reference, self.spec = encoder, decoder, reference, spec
        self.keep_encoded = keep_encoded
        self._encoded: tuple[tuple[tuple[str, bytes], ...], list[Cross]] | None = None

    def _encode(self, batch: _Batch, scales: Mapping[str, float]) -> Cross:
        # One window per call, as the runtime does on the CPU: a batch's arena is
        # several times one window's (WhisperRuntime.encoder_batch).
        return encode_in_chunks(
            lambda chunk: self.encoder.run(["cross_key", "cross_value"],
                                           {"input_features": chunk}, scales),
            batch.features, 1)

    def _score(self, batch: _Batch, cross: Cross, scales: Mapping[str, float]
               ) -> tuple[float, int]:
        spec, n = self.spec, len(batch.tokens)
        empty = np.zeros((spec.n_layers, n, spec.n_heads, 0, spec.head_dim), np.float32)
        logits = self.decoder.run(["logits"], {
            "tokens": batch.tokens, "past_key": empty, "past_value": empty,
            **cross_feed(self.decoder.input_names, *cross)}, scales)[0][:, :-1][batch.mask]
        return score(self.name, logits, batch.tokens[:, 1:][batch.mask], batch.reference)

    def __call__(self, scales: Mapping[str, float]) -> float:
        key = tuple((k, v.tobytes()) for k, v in sorted(self.encoder.scale_feed(scales).items()))
        encoded = (self._encoded[1] if self._encoded is not None and self._encoded[0] == key
                   else None)
        self._encoded = None  # the old outputs go before the new ones are made
        batches = self.reference.batches
        if encoded is None and self.keep_encoded:
            encoded = [self._encode(b, scales) for b in batches]
        total, count = 0.0, 0
        for i, b in enumerate(batches):
            part, n_scored = self._score(
                b, self._encode(b, scales) if encoded is None else encoded[i], scales)
            total, count = total + part, count + n_scored
        if encoded is not None:
            self._encoded = (key, encoded)
        return total / count if count else 0.0

    def close(self) -> None:
        self.encoder.close()
        self.decoder.close()


# ---------------------------------------------------------------- factory


def resolve_objective(kind: str, card: ModelCard) -> str:
    """The objective ESC uses: `kind`, or the card's objective for "auto"."""
    if kind == "auto":
        if card.objective not in _CARD_OBJECTIVES:
            raise SfcError(f"model card objective {card.objective!r} has no ESC objective; "
                           "give --esc-objective")
        kind = _CARD_OBJECTIVES[card.objective]
    if kind in ("teacher-forced", "kl") and card.family != "whisper":
        raise SfcError(f"ESC objective {kind!r} needs a Whisper model; {card.name} is "
                       f"{card.family!r} (use distortion)")
    if kind not in _WHISPER_METRICS:
        raise SfcError(f"unknown ESC objective {kind!r} (teacher-forced, kl, distortion)")
    return kind


@dataclass(frozen=True)
class ObjectiveSpec:
    """Everything an ESC objective is built from, picklable, so that a Ray worker builds
    the same objective from one shipped copy (`sfc.executor`).

    `kind`: the resolved metric; `graphs`: the graphs' QDQ setups (without `rewrite`
    closures when shipped); `whisper` and `decoding`: a Whisper model's FP32 reference and
    decoding spec; `feeds` and `references`: any other model's chosen feeds and FP32
    outputs per graph; `optimization`: the ORT level the quantized sessions run at.
    """

    kind: str
    graphs: Mapping[str, GraphSetup]
    optimization: str = "all"
    whisper: WhisperReference | None = None
    decoding: Any = None
    feeds: Mapping[str, Sequence[dict[str, np.ndarray]]] | None = None
    references: Mapping[str, Sequence[list[np.ndarray]]] | None = None

    def make(self, threads: int | None = None) -> WhisperObjective | DistortionObjective:
        """The objective, its sessions with `threads` intra-op threads (None: ORT's
        default, one per core)."""
        if self.whisper is not None:
            # The decoder's arena is released after each run: its teacher-forced batches
            # differ in length, so a kept arena piled up regions (whisper-base: 0.7 GB held
            # between runs, and ESC's peak 0.35 GB higher; BENCHMARKS.md, issue 13). It runs
            # once per batch of utterances, so regrowing the arena costs little; the encoder
            # runs one window per call at one shape and keeps its arena.
            # The guard's probes switch activation gates alone and repeat each window:
            # an encoder probe starts at the last cut before its first switched-off gate.
            setup = self.graphs["encoder"]
            segmented = bool(setup.gates) and not setup.tuned and not setup.switches
            encoder = ScaledSession("encoder", setup, threads=threads,
                                    optimization=self.optimization,
                                    segmented=segmented)
            decoder = ScaledSession("decoder", self.graphs["decoder"], threads=threads,
                                    optimization=self.optimization, release_arena=True)
            # Gates mean probes, which switch one at a time: most repeat the encoder's inputs.
            probes = any(setup.gates or setup.switches for setup in self.graphs.values())
            return WhisperObjective(self.kind, encoder, decoder, self.whisper, self.decoding,
                                    keep_encoded=probes)
        assert self.feeds is not None and self.references is not None
        sessions = [ScaledSession(name, setup, threads=threads, optimization=self.optimization)
                    for name, setup in self.graphs.items()]
        return DistortionObjective(sessions, [self.feeds[name] for name in self.graphs],
                                   [self.references[name] for name in self.graphs])


def objective_spec(kind: str, card: ModelCard, graphs: Mapping[str, GraphSetup], *,
                   samples: int, runtime: Any = None, utterances: Sequence[Any] = (),
                   feeds: Mapping[str, FeedSource] | None = None, progress: bool = True,
                   optimization: str = "all",
                   audio: Callable[[int, Any], np.ndarray] | None = None) -> ObjectiveSpec:
    """The spec of the objective `kind` ("auto" reads the card) for ESC over `graphs`, with
    its FP32 reference computed (see `make_objective`; `audio`: the Whisper utterances'
    samples, as `whisper_reference` takes it, e.g. packed clips')."""
    kind = resolve_objective(kind, card)
    graphs = dict(graphs)
    if card.family == "whisper":
        if runtime is None:
            raise SfcError("ESC on Whisper needs the FP32 runtime")
        missing = {"encoder", "decoder"} - set(graphs)
        if missing:
            raise SfcError(f"ESC on Whisper needs both graphs; missing {sorted(missing)}")
        reference = whisper_reference(runtime, list(utterances)[:samples], kind,
                                      progress=progress, audio=audio)
        return ObjectiveSpec(kind, graphs, optimization, whisper=reference,
                             decoding=runtime.decoding)
    lacking = sorted(set(graphs) - set(feeds or {}))
    if feeds is None or lacking:
        raise SfcError(f"the distortion objective needs calibration feeds for {lacking}")
    chosen_feeds, references = {}, {}
    for name, setup in graphs.items():
        chosen = list(islice(feeds[name].make(), samples))
        fp32 = ort.InferenceSession(setup.model.SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        off = {g: np.zeros((), np.float32) for g in setup.gates}  # probes: FP32 weights
        references[name] = [fp32.run(None, {**f, **off}) for f in chosen]
        del fp32
        chosen_feeds[name] = chosen
    return ObjectiveSpec(kind, graphs, optimization, feeds=chosen_feeds, references=references)


def make_objective(kind: str, card: ModelCard, graphs: Mapping[str, GraphSetup], *,
                   samples: int, runtime: Any = None, utterances: Sequence[Any] = (),
                   feeds: Mapping[str, FeedSource] | None = None, progress: bool = True,
                   optimization: str = "all") -> Any:
    """The objective `kind` ("auto" reads the card) for ESC over `graphs`.

    Whisper needs the FP32 `runtime` and calibration `utterances`; other models read the
    first `samples` of each graph's `feeds`. `optimization`: the ORT level the quantized
    sessions run at (the target's). The result has `name`, `__call__(scales)` and `close()`.
    """
    return objective_spec(kind, card, graphs, samples=samples, runtime=runtime,
                          utterances=utterances, feeds=feeds, progress=progress,
                          optimization=optimization).make()
