"""`sfc build`: FP32 ONNX -> plan -> calibration -> recipe -> QDQ ONNX -> target artifact.

A build folder is a deployable: `card.json` points at the target artifacts, so
`sfc transcribe` / `sfc eval` run it exactly like an export folder. Per graph it holds
`<graph>/model.fp32.onnx`, `recipe.json`, `model.qdq.onnx` and the artifact; the
report (`report.json`, `report.md`) is rendered from the saved structure.

ESC (`calibrator="esc"`) is a global pass: statistics are collected for every graph first,
the scales of all graphs are searched jointly (`calib.esc`), and only then are the
recipes written; the search is saved as `esc.json` and `plots/esc_trace.png`. Ctrl-C
during the search saves the best-so-far recipes under `esc-interrupted/` (replayable
with `--recipe`) and raises `Interrupted`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .atomic import staging_dir, write_json_atomic
from .build_config import BuildConfig, target_caps, with_limits
from .calib.esc import (
    EscCalib,
    EscResult,
    esc_search,
    plot_trace,
    quantizer_key,
    split_key,
    start_scales,
)
from .calib.feeds import Feed, whisper_feeds
from .calib.inferred_feeds import FeedSource, NoFeeds, feed_source
from .calib.methods import compute_scale
from .calib.packing import clips_digest, pack_clips, packed_audio
from .calib.stats import StatsPass, StatsSnapshot, collect_stats
from .card import GraphSpec, ModelCard
from .errors import Interrupted, SfcError
from .eval.manifest import read_manifest
from .executor import RayExecutor
from .onnx_utils import with_weights
from .paths import cache_dir
from .precision.activations import (
    gate_activations,
    gate_name,
    guard_activations,
    guard_clips,
)
from .precision.budget import WeightOption
from .precision.plots import plot_one_stage, plot_search
from .precision.probe import ProbeGraph
from .precision.search import (
    RESULT_FILE,
    GraphWeights,
    SearchConfig,
    SearchResult,
    candidate_specs,
    check_budget,
    choose,
)
from .progress import progress_bar
from .quant.gptq import GptqConfig, GramAccumulator
from .quant.lowbit import quantize_layer, recipe_method
from .quant.plan import (
    FLOAT,
    LayerPrecision,
    Plan,
    PlanConfig,
    entry_graph,
    exact_pattern,
    make_plan,
)
from .quant.qdq import write_qdq
from .quant.recipe import Recipe, model_sha256, recipe_from_plan
from .quant.rotate import Rotation, make_rotation
from .quant.sequential import stage_groups
from .quant.smooth import (
    SMOOTHING_FILE,
    ChannelAbsMax,
    Smoothing,
    smooth_sites,
    smoothing_scales,
)
from .quant.spec import (
    QuantSpec,
    TargetCaps,
)
from .quant.stored import LEARNED, STORED_FILE, StoredWeights
from .quant.tied_table import MAX_HELDOUT_RATIO, SplitGramAccumulator, heldout_ratio
from .quant.weights import dequantize_weight
from .runtime.session import shrink_shared_arena
from .serial import read_json
from .targets import get_target
from .targets.base import LoweringResult
from .targets.tensorrt_plan import ProfileLimits

__all__ = ["ESC_INTERRUPTED", "ESC_PLOT", "ESC_RESULT", "GUARD_RESULT", "BuildConfig", "GraphBuild",
           "build", "replay_source"]

logger = logging.getLogger(__name__)

# Where an ESC build saves its search (relative to the build folder).
ESC_RESULT = "esc.json"
ESC_PLOT = "plots/esc_trace.png"
ESC_INTERRUPTED = "esc-interrupted"  # best-so-far recipes after Ctrl-C
GUARD_RESULT = "act_guard.json"  # the activation guard's probes and what it kept float
ONE_STAGE_FILE = "onestage.json"  # the one-stage search's probabilities and history


@dataclass(frozen=True)
class Built:
    """What `build` made: the model's card, each graph's build, and the config as applied
    (a model without calibration feeds builds weights-only, whatever was asked)."""

    card: ModelCard
    graphs: list[GraphBuild]
    config: BuildConfig


@dataclass(frozen=True)
class GraphBuild:
    """What a build made of one graph."""

    name: str
    fp32: str
    recipe: str
    qdq: str
    lowering: LoweringResult
    fp32_bytes: int
    n_weight_quantizers: int
    n_activation_quantizers: int
    skipped: tuple[dict[str, str], ...]
    seconds: float
    n_smoothed: int = 0  # activations whose channel ranges moved into weights
    n_rotated: int = 0  # MatMul inputs Hadamard-rotated before their weights


def replay_source(recipe: Path) -> str | None:
    """The SRC a build folder was built from (its report's `src`): what `sfc build --recipe
    FOLDER` replays when no SRC is given. None for a lone recipe.json or a folder without a
    readable report."""
    report = Path(recipe) / "report.json"
    if not report.is_file():
        return None
    try:
        data = read_json(report, "build report")
    except SfcError:
        return None
    # Any report version: only `src`, unchanged since the first, is read.
    payload = data.get("_data") if isinstance(data, dict) else None
    src = payload.get("src") if isinstance(payload, dict) else None
    return src if isinstance(src, str) and src else None


def _recipe_path(config: BuildConfig, graph: str, single: bool) -> Path | None:
    if config.recipe is None:
        return None
    path = Path(config.recipe)
    if path.is_dir():
        path = path / graph / "recipe.json"
    elif not single:
        raise SfcError(f"{config.recipe}: a model with several graphs replays from a build "
                       "folder (give the folder, not one recipe.json)")
    if not path.is_file():
        raise SfcError(f"recipe not found: {path}")
    return path


def _grams(model: onnx.ModelProto, plan: Plan, tied: str) -> dict[str, GramAccumulator]:
    """weight -> the Gram accumulator of its MatMul's data input (weights read by several
    MatMuls, or by none, get none; a table that Gathers read too gets none when `tied` is
    "mse", so it rounds with MSE, and a split one for the held-out check when "auto":
    `GptqConfig.tied`); MatMuls sharing an input share one accumulator."""
    nodes = {n.name: n for n in model.graph.node}
    inits = {t.name: t for t in model.graph.initializer}
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input}
    by_input: dict[str, GramAccumulator] = {}
    out = {}
    for q in plan.weights:
        readers = [nodes[c] for c in q.consumers]
        if len(readers) != 1 or readers[0].op_type != "MatMul" or (
                q.tensor in gathered and tied == "mse"):
            continue
        data = readers[0].input[0]
        k = int(inits[q.tensor].dims[0])
        split = q.tensor in gathered and tied == "auto"
        out[q.tensor] = by_input.setdefault(
            data, SplitGramAccumulator(k) if split else GramAccumulator(k))
    return out


def _spill(grams: dict[str, GramAccumulator], folder: Path) -> None:
    """Every distinct accumulator's finished sum to a file in `folder` (read back at each
    use): the sums would otherwise stay in memory through the search and the probes."""
    for i, acc in enumerate({id(a): a for a in grams.values()}.values()):
        acc.spill(folder / f"{i}.npy")


def _choose_tied(model: onnx.ModelProto, plan: Plan, grams: dict[str, GramAccumulator],
                 gptq: GptqConfig, specs: dict[str, list[QuantSpec]]) -> dict[str, float]:
    """`GptqConfig.tied == "auto"`: each tied table whose GPTQ does not beat MSE rounding on
    held-out calibration feeds (`quant.tied_table`) loses its Gram, so it rounds with MSE.
    The check runs at the table's first GPTQ format: its plan spec, or under --weights
    mixed its first such candidate. Returns table -> held-out error ratio (recorded in the
    recipe)."""
    ratios = {}
    for q in plan.weights:
        acc = grams.get(q.tensor)
        if not isinstance(acc, SplitGramAccumulator):
            continue
        spec = next((s for s in [q.spec, *specs.get(q.tensor, [])]
                     if recipe_method("gptq", s, True) == "gptq"), None)
        if spec is None or min(h.count for h in acc.halves) == 0:
            del grams[q.tensor]  # no GPTQ format to check, or no held-out half: MSE
            continue
        w = next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer
                 if t.name == q.tensor)
        ratios[q.tensor] = heldout_ratio(w, acc.halves, spec, gptq)
        if ratios[q.tensor] > MAX_HELDOUT_RATIO:
            del grams[q.tensor]
    return ratios


def _gram_inputs(model: onnx.ModelProto, plan: Plan,
                 grams: dict[str, GramAccumulator]) -> dict[str, GramAccumulator]:
    """The Gram accumulators keyed by the data input they count, not by their weight."""
    nodes = {n.name: n for n in model.graph.node}
    by_input = {}
    for tensor, acc in grams.items():
        reader = next(q for q in plan.weights if q.tensor == tensor).consumers[0]
        by_input[nodes[reader].input[0]] = acc
    return by_input


def _stats(model: onnx.ModelProto, plan: Plan, feeds: Iterator[Feed] | None, total: int | None,
           graph: str, grams: dict[str, GramAccumulator]) -> dict[str, StatsSnapshot]:
    tensors = [q.tensor for q in plan.activations]
    if not tensors and not grams:
        return {}
    if feeds is None:
        what = ("its activations (--calib) or --activations none" if tensors else
                "GPTQ (--calib) or --weight-method mse")
        raise SfcError(f"graph {graph!r} needs calibration data for {what}")
    return collect_stats(model, tensors, feeds, total=total, progress=f"calibrating {graph}",
                         grams=_gram_inputs(model, plan, grams))


def _whisper_stats(pending: list[_Graph], runtime: Any, utterances: list[Any],
                   transcripts: dict[str, list[int]], config: BuildConfig) -> None:
    """Both Whisper graphs' statistics in one pass over the calibration audio: the
    decoder's feeds (and the transcripts it is teacher-forced on) come from the cross K/V
    of the encoder's own statistics run, so the FP32 encoder runs once per utterance, not
    twice (whisper-base's calibration 264 -> 139 s; BENCHMARKS.md, issue 13). Those K/V
    come from ORT's basic level, not the runtime's: the decoder's statistics move in the
    sixth digit and the build's search takes another path. Both graphs must have
    activations to count."""
    graphs = {g.name: g for g in pending}
    enc, dec = graphs["encoder"], graphs["decoder"]
    if config.needs_grams:
        for g in (enc, dec):
            g.grams = _grams(g.model, g.plan, config.gptq.tied)
    started, in_encoder = time.perf_counter(), [0.0]
    with StatsPass(enc.model, [q.tensor for q in enc.plan.activations],
                   grams=_gram_inputs(enc.model, enc.plan, enc.grams),
                   keep=("cross_key", "cross_value")) as encoder:
        def encode(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            start = time.perf_counter()
            cross_k, cross_v = encoder.add({"input_features": features})
            in_encoder[0] += time.perf_counter() - start
            return cross_k, cross_v

        dec.stats = _stats(dec.model, dec.plan,
                           whisper_feeds(runtime, utterances, "decoder", transcripts, encode),
                           len(utterances), "encoder and decoder", dec.grams)
        enc.stats = encoder.result()
    enc.seconds += in_encoder[0]
    dec.seconds += time.perf_counter() - started - in_encoder[0]


def _calibrate(stats: dict[str, StatsSnapshot], plan: Plan,
               config: BuildConfig) -> dict[str, tuple[float, str, dict[str, float]]]:
    method = config.calibration_method()
    out = {}
    for q in plan.activations:
        result = compute_scale(stats[q.tensor], method, bits=q.spec.bits)
        out[q.tensor] = (result.scale, result.method, dict(result.stats_summary))
    return out


@dataclass
class _Graph:
    """One graph on its way through the build."""

    name: str
    model: onnx.ModelProto
    sha: str
    plan: Plan
    replay: Recipe | None
    plan_config: PlanConfig
    seconds: float = 0.0
    stats: dict[str, StatsSnapshot] | None = None
    grams: dict[str, GramAccumulator] = field(default_factory=dict)
    # weight -> (integers, scales, recipe method), for weights the method computes here
    quantized: dict[str, tuple[Any, Any, str]] = field(default_factory=dict)
    stored: StoredWeights | None = None
    # weight -> the specs the mixed search's candidate formats give it
    specs: dict[str, list[QuantSpec]] = field(default_factory=dict)
    # weight -> (integers, scales) the one-stage search learned, and its weight digests
    learned: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    learned_digests: dict[str, str] = field(default_factory=dict)
    feeds: FeedSource | None = None  # a generic graph's calibration feeds
    # tied table -> GPTQ's held-out output error over MSE rounding's (GptqConfig.tied auto)
    tied_ratios: dict[str, float] = field(default_factory=dict)
    smoothing: Smoothing | None = None  # folded into `model` (`quant.smooth`)
    rotation: Rotation | None = None  # applied to `model` before its plan (`quant.rotate`)

    def quantize(self, tensor: str, spec: Any, method: str, gptq: GptqConfig
                 ) -> tuple[Any, Any, str]:
        """`tensor`'s integers under `spec` (cached: the search and the final recipe
        share them)."""
        key = f"{tensor}\0{spec.describe()}"
        if key not in self.quantized:
            w = next(onnx.numpy_helper.to_array(t) for t in self.model.graph.initializer
                     if t.name == tensor)
            self.quantized[key] = quantize_layer(w, spec, method, self.grams.get(tensor), gptq)
        return self.quantized[key]

    def quantize_all(self, config: BuildConfig) -> None:
        """Compute the weights whose method needs this pass (GPTQ), with progress."""
        todo = [q for q in self.plan.weights if q.tensor not in self.learned
                and recipe_method(config.weight_method, q.spec, q.tensor in self.grams) == "gptq"]
        if not todo:
            return
        if config.gptq.stages > 1 and self.feeds is not None:
            self._sequential(config, self.feeds)
        with progress_bar(transient=True) as bar:
            for q in bar.track(todo, description=f"GPTQ {self.name}"):
                self.quantize(q.tensor, q.spec, config.weight_method, config.gptq)

    def _sequential(self, config: BuildConfig, feeds: FeedSource) -> None:
        """Sequential GPTQ (`quant.sequential`): the plan's MatMul weights quantized stage
        by stage, each later stage's Gram matrices summed anew on a copy of the graph whose
        earlier stages hold their quantized weights. Replaces the FP32 pass's Gram matrices
        (and the weights cached from them) of every stage after the first."""
        nodes = {n.name: (i, n) for i, n in enumerate(self.model.graph.node)}
        weights = [q for q in self.plan.weights if q.tensor in self.grams
                   and q.tensor not in self.learned]
        data = {q.tensor: nodes[q.consumers[0]][1].input[0] for q in weights}
        position = {data[q.tensor]: nodes[q.consumers[0]][0] for q in weights}
        groups = stage_groups(position, position.__getitem__, config.gptq.stages)
        done: dict[str, Any] = {}
        for i, inputs in enumerate(groups):
            members = [q for q in weights if data[q.tensor] in inputs]
            if i > 0:
                fresh = {x: GramAccumulator(self.grams[q.tensor].gram.shape[0])
                         for q in members for x in [data[q.tensor]]}
                collect_stats(with_weights(self.model, done), [], feeds.make(),
                              total=feeds.count, grams=fresh,
                              progress=f"GPTQ {self.name}, stage {i + 1}/{len(groups)}")
                stale = {q.tensor for q in members}
                self.quantized = {k: v for k, v in self.quantized.items()
                                  if k.split("\0")[0] not in stale}
                for q in members:
                    self.grams[q.tensor] = fresh[data[q.tensor]]
            for q in members:
                ints, scales, _ = self.quantize(q.tensor, q.spec, config.weight_method,
                                                config.gptq)
                done[q.tensor] = dequantize_weight(ints, q.spec, scales)

    def recipe(self, scales: dict[str, tuple[float, str, dict[str, float]]],
               config: BuildConfig) -> Recipe:
        """The recipe of the current plan with activation `scales`; stored weights
        (GPTQ) are gathered into `self.stored`."""
        methods, arrays = {}, {}
        for q in self.plan.weights:
            if q.tensor in self.learned:
                methods[q.tensor], arrays[q.tensor] = LEARNED, self.learned[q.tensor]
                continue
            name = recipe_method(config.weight_method, q.spec, q.tensor in self.grams)
            methods[q.tensor] = name
            if name == "gptq":
                ints, sc, _ = self.quantize(q.tensor, q.spec, config.weight_method, config.gptq)
                arrays[q.tensor] = (ints, sc)
        self.stored = StoredWeights(arrays) if arrays else None
        data = config.recipe_config(self.plan_config)
        if self.learned_digests:
            data["weights"]["learned"] = self.learned_digests
        if self.tied_ratios:
            data["weights"]["tied_heldout_ratio"] = {
                t: round(r, 6) for t, r in sorted(self.tied_ratios.items())}
        if self.smoothing is not None:
            data["calibration"]["smoothing"]["data"] = self.smoothing.digest()
        if self.rotation is not None:
            data["weights"]["rotation"] = self.rotation.to_dict()
        return recipe_from_plan(self.plan, scales, self.sha, config.seed, data, methods,
                                self.stored.digest() if self.stored else None)


def _prepare(name: str, model: onnx.ModelProto, config: BuildConfig, caps: TargetCaps,
             single: bool) -> _Graph:
    start = time.perf_counter()
    replay = _recipe_path(config, name, single)
    recipe = Recipe.load(replay) if replay is not None else None
    rotation = None
    if recipe is not None:
        entry = (recipe.config.get("weights") or {}).get("rotation")
        if entry is not None:
            try:
                rotation = Rotation.from_dict(entry, model)
            except SfcError as e:  # like smoothing, it tells another model apart
                raise SfcError(f"{replay} was made for another model: {e}") from None
    elif config.rotates(name):
        rotation = make_rotation(model, config.seed)
    if rotation is not None:  # before the plan: its Hadamard MatMuls must stay float
        model = rotation.apply(model)
    sha = model_sha256(model)
    plan = make_plan(model, config.plan_config(name), caps)
    stored = None
    smoothing = None
    if replay is not None and recipe is not None:
        if recipe.weight_data is not None:
            stored = StoredWeights.load(replay.parent / STORED_FILE, recipe.weight_data)
        digest = (recipe.config.get("calibration", {}).get("smoothing") or {}).get("data")
        if digest is not None:
            smoothing = Smoothing.load(replay.parent / SMOOTHING_FILE, digest)
            try:
                model = smoothing.apply(model)
            except SfcError as e:  # its smoothing, checked first, tells another model apart
                raise SfcError(f"{replay} was made for another model: {e}") from None
            sha = model_sha256(model)
        if recipe.model_sha256 != sha:
            raise SfcError(f"{replay} was made for another model (sha256 "
                           f"{recipe.model_sha256[:12]}, this one {sha[:12]}; a zoo "
                           "model's export changes with sfc's export format: build anew)")
        # A recipe's INT8 per-channel weights for a VNNI CPU replayed for ort-cpu:avx2
        # would overflow its kernels (its 4/2-bit weights lower to MatMulNBits, no limit).
        for q in plan.weights:
            old = recipe.get(q.tensor)
            if (old is not None and old.spec.bits == 8 and old.spec.granularity == "channel"
                    and old.spec.pair_limit != q.spec.pair_limit):
                raise SfcError(f"{replay} quantizes weight '{q.tensor}' as "
                               f"{old.spec.describe()}, but {config.target} needs "
                               f"{q.spec.describe()}; replay it with the recipe's own target")
    g = _Graph(name, model, sha, plan, recipe, config.plan_config(name),
               time.perf_counter() - start)
    g.stored = stored
    g.smoothing = smoothing
    g.rotation = rotation
    return g


def _emit(g: _Graph, recipe: Recipe, config: BuildConfig, stage: Path,
          card: ModelCard) -> GraphBuild:
    start = time.perf_counter()
    folder = stage / g.name
    folder.mkdir(parents=True, exist_ok=True)
    qdq = write_qdq(g.model, recipe, stored=g.stored)
    onnx.save(g.model, str(folder / "model.fp32.onnx"))
    recipe.save(folder / "recipe.json")
    if g.stored is not None:
        g.stored.save(folder / STORED_FILE)
    if g.smoothing is not None:
        g.smoothing.save(folder / SMOOTHING_FILE)
    onnx.save(qdq, str(folder / "model.qdq.onnx"))
    target = config.lowering_target().for_graph(card, g.name)
    lowering = target.lower(folder / "model.qdq.onnx", folder)
    return GraphBuild(
        name=g.name,
        fp32=f"{g.name}/model.fp32.onnx",
        recipe=f"{g.name}/recipe.json",
        qdq=f"{g.name}/model.qdq.onnx",
        lowering=lowering,
        fp32_bytes=(folder / "model.fp32.onnx").stat().st_size,
        n_weight_quantizers=sum(t.kind == "weight" for t in recipe.tensors),
        n_activation_quantizers=sum(t.kind == "activation" for t in recipe.tensors),
        skipped=tuple(s.to_dict() for s in recipe.skipped),
        seconds=g.seconds + time.perf_counter() - start,
        n_smoothed=0 if g.smoothing is None else len(g.smoothing.scales),
        n_rotated=0 if g.rotation is None else len(g.rotation.signs),
    )


def _fp32_runtime(folder: Path) -> Any:
    """The FP32 Whisper runtime the build decodes its calibration feeds and references with.
    On ORT's shared arena: the build holds it while its other sessions run, and without
    an arena its encoder ran 1.4x slower on whisper-base (BENCHMARKS.md, issue 13). What
    its runs leave in the arena stays there until `shrink_shared_arena`, called where the
    build goes on without its encoder's runs (calibration after smoothing's transcripts,
    ESC, the probes, one-stage training)."""
    from .runtime.whisper import WhisperRuntime

    return WhisperRuntime.open(folder, arena="shared")


def _esc_identity(setups: dict[str, Any], card: ModelCard, config: BuildConfig,
                  utterances: list[Any], feeds: dict[str, FeedSource], samples: int) -> str:
    """What the ESC objective measures besides the scales, for the search's checkpoint key:
    the start recipes' numerics and tuned quantizers, the card (decoding), the target's ORT
    level, and the calibration items the objective reads (audio or packed clips, or feed
    arrays)."""
    from itertools import islice

    from .precision.onestage_whisper import audio_digest

    numerics = [[name, s.recipe.model_sha256, s.recipe.weight_data,
                 [t.to_dict() for t in s.recipe.tensors], list(s.tuned)]
                + ([list(s.session_config)] if s.session_config else [])
                for name, s in sorted(setups.items())]
    if card.family == "whisper":
        data = (clips_digest(utterances[:samples]) if config.packs
                else audio_digest(utterances[:samples]))
    else:
        h = hashlib.sha256()
        for name, source in sorted(feeds.items()):
            for feed in islice(source.make(), samples):
                for k, v in sorted(feed.items()):
                    h.update(f"{name}:{k}:{v.dtype}:{v.shape}".encode())
                    h.update(v.tobytes())
        data = h.hexdigest()
    import onnxruntime

    # ONNX Runtime's version too: another release may score the same scales differently.
    what = [numerics, card.to_dict(), get_target(config.target).optimization,
            config.calib_limit, data, onnxruntime.__version__]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()


def _session_config(config: BuildConfig, card: ModelCard, g: _Graph
                    ) -> tuple[tuple[str, str], ...]:
    """The target's ORT session config for graph `g`, for ESC's, the guard's and the
    probes' sessions (`Target.session_config`): what its lowering uses."""
    target = get_target(config.target).for_graph(card, g.name)
    return tuple(sorted(target.session_config(g.model).items()))


def _objective_clips(utterances: list[Any], config: BuildConfig
                     ) -> tuple[list[Any], Callable[[int, Any], np.ndarray] | None]:
    """The clips ESC's Whisper objective scores and the `audio` hook that reads them:
    `utterances` packed into windows (`calib.packing`), or as they are."""
    if not config.packs or not utterances:
        return utterances, None
    return list(pack_clips(utterances)), packed_audio


def _ray(spec: Any, config: BuildConfig) -> RayExecutor | None:
    """Ray workers for the objective `spec` when the build asks for them (--workers,
    --ray-address), else None (this process)."""
    if config.workers is None and config.ray_address is None:
        return None
    return RayExecutor(spec, address=config.ray_address, workers=config.workers)


def _esc(graphs: list[_Graph], card: ModelCard, config: BuildConfig, fp32_folder: Path,
         utterances: list[Any]) -> tuple[dict[str, Recipe], EscResult]:
    """ESC over all graphs jointly: MSE start, CMA-ES search, one recipe per graph. A
    Whisper model's FP32 runtime is opened for the objective's reference alone. The search
    resumes from its checkpoint under the cache's esc/ folder after a crash or Ctrl-C."""
    from .calib.objectives import GraphSetup, objective_spec

    method: EscCalib = config.calibration_method()
    bits = config.activations or 8
    starts, setups, start = {}, {}, {}
    for g in graphs:
        assert g.stats is not None
        op_types = {q.tensor: q.op_types for q in g.plan.activations}
        starts[g.name] = start_scales(g.stats, op_types, method, bits)
        scales = {t: (r.scale, r.method, r.stats_summary) for t, (r, _) in starts[g.name].items()}
        tuned = tuple(t for t, (_, on) in starts[g.name].items() if on)
        setups[g.name] = GraphSetup(g.model, g.recipe(scales, config), tuned, stored=g.stored,
                                    session_config=_session_config(config, card, g))
        start.update({quantizer_key(g.name, t): starts[g.name][t][0].scale for t in tuned})
    runtime = _fp32_runtime(fp32_folder) if card.family == "whisper" else None
    clips, audio = _objective_clips(utterances[:method.samples], config)
    spec = objective_spec(method.objective, card, setups, samples=len(clips) or method.samples,
                          runtime=runtime, utterances=clips, feeds=_sources(graphs),
                          optimization=get_target(config.target).optimization, audio=audio)
    del runtime  # release point: the search runs without the FP32 runtime
    shrink_shared_arena()  # nor with what its runs left in the shared arena
    identity = _esc_identity(setups, card, config, clips, _sources(graphs),
                             len(clips) or method.samples)
    objective = spec.make()
    executor = None
    try:
        executor = _ray(spec, config)
        result = esc_search(start, objective, method, config.seed, objective_name=objective.name,
                            checkpoints=cache_dir() / "esc", identity=identity,
                            executor=executor)
    finally:
        if executor is not None:
            executor.close()
        objective.close()
    recipes = {}
    for g in graphs:
        final = {}
        for tensor, (r, on) in starts[g.name].items():
            summary = dict(r.stats_summary)
            if on:
                key = quantizer_key(g.name, tensor)
                summary |= {"mse_scale": r.scale, "esc_ratio": result.scales[key] / r.scale}
                final[tensor] = (result.scales[key], method.name, summary)
            else:
                final[tensor] = (r.scale, r.method, summary)
        recipes[g.name] = g.recipe(final, config)
    return recipes, result


def _guard(pending: list[_Graph], recipes: dict[str, Recipe], card: ModelCard,
           config: BuildConfig, caps: TargetCaps, fp32_folder: Path, utterances: list[Any],
           stage: Path) -> dict[str, Recipe]:
    """The activation guard (`precision.activations`): probe the calibrated recipes, and
    re-plan with the activations it keeps float as per-node precision entries (the other
    scales unchanged). Saves act_guard.json in the stage."""
    from .calib.objectives import GraphSetup, make_objective

    assert config.act_guard is not None
    tensors, setups = {}, {}
    for g in pending:
        acts = tuple(t.tensor for t in recipes[g.name].tensors if t.kind == "activation")
        tensors[g.name] = acts

        def rewrite(model: onnx.ModelProto, acts: tuple[str, ...] = acts) -> onnx.ModelProto:
            return gate_activations(model, acts)

        setups[g.name] = GraphSetup(g.model, recipes[g.name], (),
                                    tuple(gate_name(t) for t in acts), g.stored, rewrite,
                                    _session_config(config, card, g))
    clips = guard_clips(len(utterances), config.esc_samples if config.uses_esc else 0,
                        config.act_guard.samples)
    # The FP32 runtime serves the reference alone: the probes run without it.
    objective = make_objective("kl", card, setups, samples=len(clips),
                               runtime=_fp32_runtime(fp32_folder),
                               utterances=utterances[clips.start:clips.stop],
                               optimization=get_target(config.target).optimization)
    # Same quantizers and clips: the same probes, so a rerun, a resumed build or another
    # allowance reuses them (the recipes' config, which records the allowance, is left out).
    numerics: list[Any] = [[r.model_sha256, r.weight_data, [t.to_dict() for t in r.tensors]]
                           for r in recipes.values()]
    if any(s.session_config for s in setups.values()):  # earlier probe files keep their keys
        numerics.append([list(s.session_config) for s in setups.values()])
    key = hashlib.sha256(json.dumps([numerics, [clips.start, clips.stop]]).encode()).hexdigest()
    checkpoint = cache_dir() / "probes" / f"act-{key[:24]}.json"
    try:
        result = guard_activations(objective, tensors, config.act_guard, checkpoint, key)
    finally:
        objective.close()
    write_json_atomic(stage / GUARD_RESULT,
                      {**result.to_dict(), "clips": [clips.start, clips.stop]})
    for g in pending:
        float_acts = {t for graph, t in map(split_key, result.kept) if graph == g.name}
        if not float_acts:
            continue
        nodes = [n for q in g.plan.activations if q.tensor in float_acts for n in q.consumers]
        g.plan_config = replace(g.plan_config, precision=g.plan_config.precision + tuple(
            LayerPrecision(exact_pattern(n), activations=FLOAT) for n in nodes))
        g.plan = make_plan(g.model, g.plan_config, caps)
        scales = {t.tensor: (t.scale, t.method, t.stats) for t in recipes[g.name].tensors
                  if t.kind == "activation" and t.scale is not None}
        recipes[g.name] = g.recipe(scales, config)
    return recipes


def _save_interrupted(out: Path, recipes: dict[str, Recipe], result: EscResult) -> str:
    """Write the best-so-far recipes and the search under out/esc-interrupted; the message."""
    folder = out / ESC_INTERRUPTED
    for name, recipe in recipes.items():
        recipe.save(folder / name / "recipe.json")
    result.save(folder / ESC_RESULT)
    return (f"interrupted: ESC stopped after {result.evaluations} evaluations; best-so-far "
            f"recipes (objective {result.final_objective:.5g}, MSE start "
            f"{result.start_objective:.5g}) saved in {folder} (finish with --recipe {folder}, "
            "or run the same command again to resume the search)")


def _check_one_stage(card: ModelCard, config: BuildConfig) -> None:
    """Before any calibration: learning the weights needs a zoo Whisper checkpoint."""
    if config.learns and config.recipe is None and (
            card.family != "whisper" or "zoo" not in card.source):
        what = "--search one-stage" if config.one_stage else "--finetune-steps"
        raise SfcError(f"{what} trains through the PyTorch checkpoint: it needs a zoo "
                       "Whisper model (e.g. whisper-tiny.en)")


def _one_stage(weights: list[GraphWeights], pending: list[_Graph], card: ModelCard,
               config: BuildConfig, search: SearchConfig, runtime: Any,
               utterances: list[Any], stage: Path) -> SearchResult:
    """The one-stage search (`search`: one-stage settings); the learned integers and
    scales go to each graph."""
    from .precision.onestage_whisper import audio_digest, choose_one_stage

    zoo = card.source["zoo"]  # `_check_one_stage` made sure
    extra = [u for folder in config.train_data for u in read_manifest(folder)]
    result, learned = choose_one_stage(weights, search, zoo, runtime, utterances,
                                       cache_dir() / "onestage", extra)
    write_json_atomic(stage / ONE_STAGE_FILE, learned.to_dict())
    plot_one_stage(learned.to_dict(), result.bits_allowed / result.params, stage)
    for g in pending:
        g.learned = {key.split(":", 1)[1]: (q, s)
                     for key, (_, q, s) in learned.weights.chosen.items()
                     if key.split(":", 1)[0] == g.name}
        g.learned_digests = {"original_sha256": learned.weights.original_sha256,
                             "learned_sha256": learned.weights.learned_sha256,
                             "train_data_sha256": audio_digest(extra)}
    return result


def _search(pending: list[_Graph], card: ModelCard, config: BuildConfig, caps: TargetCaps,
            runtime: Any, utterances: list[Any], stage: Path, fp32_folder: Path) -> None:
    """Mixed precision over all graphs jointly (two-stage, or one-stage on a zoo Whisper
    checkpoint); each graph's plan becomes the plan with the chosen per-layer entries.
    Saves precision.json in the stage. `runtime`: the FP32 Whisper runtime, or None where
    the build released it (the probes' objective then opens it for its reference alone)."""
    from .calib.objectives import GraphSetup, objective_spec

    assert config.search is not None
    weights = []
    for g in pending:
        def quantize(tensor: str, spec: Any, g: _Graph = g) -> tuple[Any, Any, str]:
            return g.quantize(tensor, spec, config.weight_method, config.gptq)

        weights.append(GraphWeights(g.name, g.model, g.plan, g.specs, g.grams, quantize, caps))

    sessions = {g.name: _session_config(config, card, g) for g in pending}

    def objective(built: dict[str, ProbeGraph]) -> Any:
        setups = {name: GraphSetup(p.model, Recipe(model_sha256(p.model), config.seed, {}, ()),
                                   (), switches=p.switches, session_config=sessions[name])
                  for name, p in built.items()}
        # KL to FP32 (>= 0, no transcript-likelihood noise) for Whisper; distortion else.
        kind = "kl" if card.family == "whisper" else "auto"
        assert config.search is not None
        fp32 = runtime
        if fp32 is None and card.family == "whisper":
            fp32 = _fp32_runtime(fp32_folder)
        spec = objective_spec(kind, card, setups, samples=config.search.samples,
                              runtime=fp32, utterances=utterances, feeds=_sources(pending))
        shrink_shared_arena()  # the references are made: the probes run without the FP32 runs
        return spec

    if config.search.method == "one-stage":
        result = _one_stage(weights, pending, card, config, config.search, runtime,
                            utterances, stage)
    else:
        # The probes' GPTQ uses the FP32 pass's Gram matrices whatever the stages.
        method_key = json.dumps([config.weight_method, replace(config.gptq, stages=1).to_dict(),
                                 config.calib.name, config.calib_limit, config.seed,
                                 config.target]
                                + ([sorted(sessions.items())] if any(sessions.values()) else []))
        result = choose(weights, config.search, objective, cache_dir() / "probes", method_key,
                        open_executor=lambda spec: _ray(spec, config))
    result.save(stage / RESULT_FILE)
    plot_search(result.to_dict(), stage, with_frontier=config.search.method == "two-stage")
    entries = result.entries()
    for g in pending:
        g.plan_config = replace(g.plan_config,
                                precision=entries.get(g.name, ()) + g.plan_config.precision)
        plan = make_plan(g.model, g.plan_config, caps)
        for c in (c for c in result.layers if c.graph == g.name):
            got = plan.get(c.tensor)
            if got is None or WeightOption(got.spec, 0).label != c.label:
                raise SfcError(f"internal: the plan did not give '{c.tensor}' its chosen "
                               f"format {c.label}")
        g.plan = plan
        if g.stats is not None:
            g.stats = {q.tensor: g.stats[q.tensor] for q in plan.activations}
    if config.search.finetune is not None:
        # Two-stage with fine-tuning: the one-stage run on one candidate per weight, the
        # format the program chose; its own result only records the fine-tuning.
        chosen = {(c.graph, c.tensor): c.chosen for c in result.layers}
        fixed = [replace(w, specs={t: [s[chosen[w.name, t]]] if (w.name, t) in chosen else s
                                   for t, s in w.specs.items()}) for w in weights]
        _one_stage(fixed, pending, card, config,
                   replace(config.search, method="one-stage", one_stage=config.search.finetune,
                           finetune=None), runtime, utterances, stage)


def _whisper_source(runtime: Any, utterances: list[Any], graph: str,
                    transcripts: dict[str, list[int]]) -> FeedSource:
    """A Whisper graph's calibration feeds from the FP32 runtime (decoder feeds
    teacher-forced on its own transcripts, decoded once into `transcripts`)."""
    return FeedSource("the calibration audio through the FP32 model",
                      lambda: whisper_feeds(runtime, utterances, graph, transcripts),
                      len(utterances))


def _smooth(prepared: list[_Graph], card: ModelCard, config: BuildConfig, fp32_folder: Path,
            runtime: Any, utterances: list[Any], sources: dict[str, FeedSource],
            stage: Path) -> Path | None:
    """Activation smoothing (`quant.smooth`): each graph's channel ranges on the first
    calibration clips (its own FP32 pass), folded into its model; the smoothed model is
    written to the stage's `_smoothed` folder, the FP32 model the rest of the build
    calibrates and compares against (None: nothing to smooth)."""
    import itertools

    assert config.smooth is not None
    clips = config.smooth.clips
    for g in prepared:
        sites = smooth_sites(g.model, [q.tensor for q in g.plan.activations])
        if not sites:
            continue
        if runtime is not None:  # own transcripts: calibration decodes with the smoothed model
            source = _whisper_source(runtime, utterances[:clips], g.name, {})
        elif g.name in sources:
            source = sources[g.name]
        else:
            continue
        accs = {x: ChannelAbsMax() for x in sites}
        collect_stats(g.model, [], itertools.islice(source.make(), clips),
                      total=clips if source.count is None else min(clips, source.count),
                      progress=f"smoothing {g.name}", grams=accs)
        inits = {t.name: t for t in g.model.graph.initializer}
        g.smoothing = Smoothing({x: smoothing_scales(
            accs[x].result(), [onnx.numpy_helper.to_array(inits[w]) for w in site.weights],
            config.smooth.alpha) for x, site in sites.items()})
        g.model = g.smoothing.apply(g.model)
        g.sha = model_sha256(g.model)
    if all(g.smoothing is None for g in prepared):
        return None
    folder = stage / "_smoothed"
    folder.mkdir()
    card.save(folder)
    if card.tokenizer:
        shutil.copyfile(fp32_folder / card.tokenizer, folder / card.tokenizer)
    for g in prepared:
        onnx.save(g.model, str(folder / card.graphs[g.name].path))
    return folder


def _drop_feeds(graphs: list[_Graph]) -> None:
    """Drop the graphs' Whisper feeds, which hold the FP32 runtime."""
    for g in graphs:
        g.feeds = None


def _sources(graphs: list[_Graph]) -> dict[str, FeedSource]:
    return {g.name: g.feeds for g in graphs if g.feeds is not None}


def _generic_feeds(card: ModelCard, folder: Path, config: BuildConfig
                   ) -> tuple[BuildConfig, dict[str, FeedSource], str | None]:
    """Each graph's calibration feeds (`.npz`, or inferred from the calibration audio);
    when a graph has none, the build goes weights-only (float activations, no GPTQ), except
    a mixed build, which cannot search without data: then the reason comes back, for an
    error once the budget has been checked (a bad budget is reported first)."""
    sources = {}
    for name, spec in card.graphs.items():
        source = feed_source(config.calib, folder / spec.path, spec.inputs, config.calib_limit)
        if isinstance(source, NoFeeds):
            if config.mixed:
                return config, {}, source.reason
            logger.warning("weights only: %s", source.reason)
            return replace(config, activations=None, weight_method="mse"
                           if config.needs_grams else config.weight_method), {}, None
        logger.warning("%s", source.description)
        sources[name] = source
    return config, sources, None


def build(src: str, out: Path, config: BuildConfig, *, into: Path | None = None) -> Built:
    """Build `src` (zoo name, export folder or .onnx file) into the build folder `out`.
    `into`: an open staging folder of `out` to write instead (`compile_model`'s, published
    with the WER check and the report); by default the build stages and publishes itself."""
    from .models import model_folder
    from .models.onnx_source import export_onnx_file

    caps = target_caps(config.target)
    out = Path(out)
    with (nullcontext(into) if into is not None else staging_dir(out) as stage,
          ExitStack() as scratch):
        if src.endswith(".onnx"):
            fp32_folder = stage / "_source"
            export_onnx_file(src, fp32_folder)
        else:
            fp32_folder = model_folder(src)
        card = ModelCard.load(fp32_folder)
        _check_one_stage(card, config)
        for unknown in sorted(set(config.rotate) - {"all"} - set(card.graphs)):
            raise SfcError(f"--rotate {unknown}: this model has no graph '{unknown}' (its "
                           f"graphs: {', '.join(card.graphs)})")
        for entry in config.precision:
            graph = entry_graph(entry)
            if graph is not None and graph not in card.graphs:
                raise SfcError(f"precision entry '{entry.pattern}': this model has no graph "
                               f"'{graph}' (its graphs: {', '.join(card.graphs)})")
        sources: dict[str, FeedSource] = {}
        no_feeds = None  # why a mixed build has no calibration feeds
        if card.family != "whisper" and config.recipe is None and (
                config.activations is not None or config.needs_grams):
            config, sources, no_feeds = _generic_feeds(card, fp32_folder, config)
        graphs: list[GraphBuild] = []
        single = len(card.graphs) == 1
        runtime = None
        utterances = []
        needs_data = config.activations is not None or config.needs_grams or config.learns
        if card.family == "whisper" and needs_data and config.recipe is None:
            runtime = _fp32_runtime(fp32_folder)
            utterances = read_manifest(config.calib)[: config.calib_limit]
        prepared = [_prepare(name, onnx.load(str(fp32_folder / spec.path)), config, caps,
                             single) for name, spec in card.graphs.items()]
        if config.smooths and config.recipe is None:
            smoothed = _smooth(prepared, card, config, fp32_folder, runtime, utterances,
                               sources, stage)
            if smoothed is not None:
                fp32_folder = smoothed
                if runtime is not None:  # one FP32 runtime at a time (0.46 GB on base)
                    runtime = None
                    # Calibration's encoder runs in its own pass, not on the arena where
                    # smoothing's transcripts left the FP32 encoder's footprint.
                    shrink_shared_arena()
                    runtime = _fp32_runtime(fp32_folder)
        if config.mixed and not any(g.plan.weights for g in prepared):
            raise SfcError("--weights mixed: the plan quantizes no weight of this model")
        if config.mixed and config.search is not None:
            for g in prepared:
                g.specs = candidate_specs(g.model, g.plan_config, caps,
                                          config.search.candidates)[1]
            check_budget([(g.model, g.plan, g.specs) for g in prepared if g.replay is None],
                         config.search.budget)
        if no_feeds is not None:
            raise SfcError(f"--weights mixed needs calibration feeds: {no_feeds}")
        pending: list[_Graph] = []
        transcripts: dict[str, list[int]] = {}  # the FP32 model's ids, decoded once
        for g in prepared:
            if g.replay is not None:
                graphs.append(_emit(g, g.replay, config, stage, card))
                continue
            if runtime is not None:
                g.feeds = _whisper_source(runtime, utterances, g.name, transcripts)
            elif g.name in sources:
                g.feeds = sources[g.name]
            pending.append(g)
        if runtime is not None and {g.name for g in pending} == {"encoder", "decoder"} and all(
                g.plan.activations for g in pending):
            _whisper_stats(pending, runtime, utterances, transcripts, config)
        for g in pending:
            started = time.perf_counter()
            if g.stats is None:
                # One graph's Gram sums at a time (whisper-small's fc2 inputs alone hold
                # 12 x 3072^2 float64, 0.9 GB).
                if config.needs_grams:
                    g.grams = _grams(g.model, g.plan, config.gptq.tied)
                feeds, total = (g.feeds.make(), g.feeds.count) if g.feeds is not None else (None, 0)
                g.stats = _stats(g.model, g.plan, feeds, total, g.name, g.grams)
            g.tied_ratios = _choose_tied(g.model, g.plan, g.grams, config.gptq, g.specs)
            if g.grams:
                _spill(g.grams, Path(scratch.enter_context(
                    tempfile.TemporaryDirectory(prefix="sfc-grams-"))))
            g.seconds += time.perf_counter() - started
        # Release point: the FP32 runtime (0.46 GB on whisper-base, 1.15 GB on the
        # shape-true whisper-small) and the Whisper feeds that hold it go; the probes'
        # objective, ESC and the guard reopen it for their references alone, not for their
        # minutes of search and probes. Learning (one-stage, fine-tuning) and sequential
        # GPTQ read them, so then they go once those are done.
        if runtime is not None and not config.learns and config.gptq.stages == 1:
            runtime = None
            _drop_feeds(pending)
        if config.mixed and pending:
            _search(pending, card, config, caps, runtime, utterances, stage, fp32_folder)
        for g in pending:
            g.quantize_all(config)
        if runtime is not None:
            runtime = None
            _drop_feeds(pending)
        if config.uses_esc and config.activations is not None and pending:
            recipes, result = _esc(pending, card, config, fp32_folder, utterances)
            if result.interrupted:
                raise Interrupted(_save_interrupted(out, recipes, result))
            result.save(stage / ESC_RESULT)
            plot_trace(result, stage / ESC_PLOT)
        else:
            recipes = {g.name: g.recipe(_calibrate(g.stats or {}, g.plan, config), config)
                       for g in pending}
        if (config.act_guard is not None and config.activations is not None
                and card.family == "whisper" and pending):
            recipes = _guard(pending, recipes, card, config, caps, fp32_folder, utterances,
                             stage)
        graphs += [_emit(g, recipes[g.name], config, stage, card) for g in pending]
        built = replace(card, graphs={
            g.name: GraphSpec(path=f"{g.name}/{g.lowering.artifact}",
                              inputs=card.graphs[g.name].inputs,
                              outputs=card.graphs[g.name].outputs,
                              optimization=g.lowering.optimization)
            for g in graphs
        }, source={**card.source, "build": f"sfc build {src}"})
        if card.tokenizer:
            shutil.copyfile(fp32_folder / card.tokenizer, stage / card.tokenizer)
        built.save(stage)
        shutil.rmtree(stage / "_source", ignore_errors=True)
        shutil.rmtree(stage / "_smoothed", ignore_errors=True)
    return Built(built, graphs, config)


def lower_qdq(qdq: Path, out: Path, target: str, limits: ProfileLimits | None = None,
              float_type: str = "fp16", fused_attention: bool = False) -> LoweringResult:
    """`sfc build --from-qdq`: lower an existing QDQ (or TensorRT-ready) ONNX file into `out`.

    Inside a build folder (`out` is `<build>/<graph>`), the build's model card gives the
    graph's optimisation profile; elsewhere the file's own input shapes do.
    """
    qdq, out = Path(qdq), Path(out)
    if not qdq.is_file():
        raise SfcError(f"QDQ model not found: {qdq}")
    lowering = with_limits(get_target(target), limits or ProfileLimits(), float_type,
                           fused_attention)
    card_folder = out.parent
    if (card_folder / "card.json").is_file():
        card = ModelCard.load(card_folder)
        if out.name in card.graphs:
            lowering = lowering.for_graph(card, out.name)
    return lowering.lower(qdq, out)
