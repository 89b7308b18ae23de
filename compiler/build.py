"""`sfc build`: FP32 ONNX -> plan -> calibration -> recipe -> QDQ ONNX -> target artifact.

A build folder is a deployable: `card.json` points at the target artifacts, so
`sfc transcribe` / `sfc eval` run it exactly like an export folder. Per graph it holds
`<graph>/model.fp32.onnx`, `recipe.json`, `model.qdq.onnx` and the artifact; the
report (`report.json`, `report.md`) is rendered from the saved structure.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx

from .atomic import staging_dir
from .calib.feeds import Feed, npz_feeds, whisper_feeds
from .calib.methods import compute_scale, method_from_name
from .calib.stats import collect_stats
from .card import GraphSpec, ModelCard
from .errors import SfcError
from .eval.manifest import read_manifest
from .paths import BUNDLED_DATA
from .quant.plan import Plan, PlanConfig, make_plan
from .quant.qdq import write_qdq
from .quant.recipe import Recipe, model_sha256, recipe_from_plan
from .quant.spec import ORT_CPU_CAPS, TargetCaps
from .targets import get_target
from .targets.base import LoweringResult

__all__ = ["BuildConfig", "GraphBuild", "build"]

logger = logging.getLogger(__name__)

# Quantization capabilities per target; placement reads these, never the target's name.
_CAPS: dict[str, TargetCaps] = {"ort-cpu": ORT_CPU_CAPS}


@dataclass(frozen=True)
class BuildConfig:
    """Everything `sfc build` was asked to do (recorded in each recipe and the report)."""

    target: str = "ort-cpu"
    weights: int = 8
    activations: int | None = 8
    calibrator: str = "max"
    calib: Path = BUNDLED_DATA / "calib"
    calib_limit: int | None = None
    recipe: Path | None = None  # a build folder or recipe.json to replay
    exclude: tuple[str, ...] = ()
    block_size: int = 32
    quantize_attention: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        # Fail on a bad option before minutes of calibration, not after.
        self.plan_config()
        if self.activations is not None:
            method_from_name(self.calibrator)

    def plan_config(self) -> PlanConfig:
        """The placement request this build makes."""
        return PlanConfig(weight_bits=self.weights, activation_bits=self.activations,
                          block_size=self.block_size,
                          quantize_attention=self.quantize_attention, exclude=self.exclude)

    def recipe_config(self) -> dict[str, Any]:
        """What goes into recipe.json: machine-independent settings only."""
        calib: dict[str, Any] = {"limit": self.calib_limit, "data": self.calib.name}
        if self.activations is not None:
            calib.update(method_from_name(self.calibrator).to_dict())
        return {"plan": self.plan_config().to_dict(), "target": self.target,
                "calibration": calib}


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


def _calibrate(model: onnx.ModelProto, plan: Plan, feeds: Iterator[Feed], total: int,
               config: BuildConfig, graph: str) -> dict[str, tuple[float, str, dict[str, float]]]:
    tensors = [q.tensor for q in plan.activations]
    if not tensors:
        return {}
    stats = collect_stats(model, tensors, feeds, total=total, progress=f"calibrating {graph}")
    method = method_from_name(config.calibrator)
    out = {}
    for tensor, snap in stats.items():
        result = compute_scale(snap, method, bits=config.activations or 8)
        out[tensor] = (result.scale, result.method, dict(result.stats_summary))
    return out


def _build_graph(name: str, model: onnx.ModelProto, feeds: Iterator[Feed] | None, total: int,
                 config: BuildConfig, caps: TargetCaps, stage: Path,
                 single: bool) -> GraphBuild:
    start = time.perf_counter()
    folder = stage / name
    folder.mkdir(parents=True, exist_ok=True)
    sha = model_sha256(model)
    replay = _recipe_path(config, name, single)
    plan = make_plan(model, config.plan_config(), caps)
    if replay is not None:
        recipe = Recipe.load(replay)
        if recipe.model_sha256 != sha:
            raise SfcError(f"{replay} was made for another model (sha256 "
                           f"{recipe.model_sha256[:12]}, this one {sha[:12]})")
    else:
        scales = {}
        if plan.activations:
            if feeds is None:
                raise SfcError(f"graph {name!r} needs calibration data for its activations "
                               "(--calib) or --activations none")
            scales = _calibrate(model, plan, feeds, total, config, name)
        recipe = recipe_from_plan(plan, scales, sha, config.seed, config.recipe_config())
    qdq = write_qdq(model, recipe)
    onnx.save(model, str(folder / "model.fp32.onnx"))
    recipe.save(folder / "recipe.json")
    onnx.save(qdq, str(folder / "model.qdq.onnx"))
    lowering = get_target(config.target).lower(folder / "model.qdq.onnx", folder)
    return GraphBuild(
        name=name,
        fp32=f"{name}/model.fp32.onnx",
        recipe=f"{name}/recipe.json",
        qdq=f"{name}/model.qdq.onnx",
        lowering=lowering,
        fp32_bytes=(folder / "model.fp32.onnx").stat().st_size,
        n_weight_quantizers=sum(t.kind == "weight" for t in recipe.tensors),
        n_activation_quantizers=sum(t.kind == "activation" for t in recipe.tensors),
        skipped=tuple(s.to_dict() for s in recipe.skipped),
        seconds=time.perf_counter() - start,
    )


def build(src: str, out: Path, config: BuildConfig) -> tuple[ModelCard, list[GraphBuild]]:
    """Build `src` (zoo name, export folder or .onnx file) into the build folder `out`."""
    from .models import model_folder
    from .models.onnx_source import export_onnx_file

    if config.target not in _CAPS:
        get_target(config.target)  # raises the one-line "unknown target" error
        raise SfcError(f"target {config.target!r} has no quantization capabilities yet")
    caps = _CAPS[config.target]
    out = Path(out)
    with staging_dir(out) as stage:
        if src.endswith(".onnx"):
            fp32_folder = stage / "_source"
            export_onnx_file(src, fp32_folder)
        else:
            fp32_folder = model_folder(src)
        card = ModelCard.load(fp32_folder)
        graphs: list[GraphBuild] = []
        single = len(card.graphs) == 1
        runtime = None
        utterances = []
        if card.family == "whisper" and config.activations is not None and config.recipe is None:
            from .runtime.whisper import WhisperRuntime

            runtime = WhisperRuntime.open(fp32_folder)
            utterances = read_manifest(config.calib)[: config.calib_limit]
        for name, spec in card.graphs.items():
            model = onnx.load(str(fp32_folder / spec.path))
            feeds: Iterator[Feed] | None = None
            total = 0
            if runtime is not None:
                feeds, total = whisper_feeds(runtime, utterances, name), len(utterances)
            elif card.family != "whisper" and config.activations is not None:
                names = [t.name for t in spec.inputs]
                feeds = npz_feeds(config.calib, names)
                total = len(list(Path(config.calib).glob("*.npz")))
            graphs.append(_build_graph(name, model, feeds, total, config, caps, stage, single))
        built = replace(card, graphs={
            g.name: GraphSpec(path=f"{g.name}/{g.lowering.artifact}",
                              inputs=card.graphs[g.name].inputs,
                              outputs=card.graphs[g.name].outputs)
            for g in graphs
        }, source={**card.source, "build": f"sfc build {src}"})
        if card.tokenizer:
            shutil.copyfile(fp32_folder / card.tokenizer, stage / card.tokenizer)
        built.save(stage)
        shutil.rmtree(stage / "_source", ignore_errors=True)
    return built, graphs
