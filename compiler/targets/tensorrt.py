"""The `tensorrt` target: sfc's QDQ ONNX -> TensorRT-ready ONNX -> serialized engine.

Lowering, in order:
1. `model.trt.onnx`: the QDQ graph with sub-4-bit layers replaced by the W2A16 plugin node
   (`trt_rewrites.substitute_plugins`) and FP16 float layers, FP32 where a rule of
   `trt_float.RULES` says (`trt_float.lower_float`: a strongly typed engine computes each
   layer in the graph's type); written everywhere, TensorRT or not.
2. `model.plan`: where TensorRT is importable, the engine, built by the decisions of
   `tensorrt_plan.engine_settings` (strongly typed from 10.12; weakly typed with
   INT8/INT4/FP16 flags for 10.3 on JetPack 6), one optimisation profile from the model
   card, a workspace limit and a reused timing cache; plus `model.plan.layers.json`, the
   engine inspector's per-layer precision table.

Where TensorRT is absent (sfc's development and CI machines: it cannot be installed there),
step 2 is skipped and the result says so, with the command that finishes the build on the
device. Engines are specific to a GPU and TensorRT version anyway, so they are built where
they run. Nothing in this module has been run against a real TensorRT here: it is written
against the documented Python API and type-checked with `tensorrt-stubs`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx

from ..atomic import atomic_path, staging_dir
from ..card import ModelCard
from ..errors import SfcError
from .base import LoweringResult, artifact_bytes, fusion_census
from .tensorrt_plan import (
    DEFAULT_VERSION,
    EngineSettings,
    ProfileLimits,
    TrtVersion,
    engine_settings,
    precision_table,
)
from .trt_float import FLOAT_TYPES, lower_float
from .trt_rewrites import substitute_plugins

__all__ = ["ENGINE", "TRT_ONNX", "TensorRTTarget", "installed_version", "tensorrt_available"]

logger = logging.getLogger(__name__)

TRT_ONNX = "model.trt.onnx"
ENGINE = "model.plan"
LAYERS = "model.plan.layers.json"
TIMING_CACHE = "timing.cache"


def tensorrt_available() -> bool:
    """True when a real TensorRT is importable (not just `tensorrt-stubs`' namespace)."""
    if importlib.util.find_spec("tensorrt") is None:
        return False
    import tensorrt

    return hasattr(tensorrt, "Builder")


def installed_version() -> TrtVersion | None:
    """The importable TensorRT's version, or None."""
    if not tensorrt_available():
        return None
    import tensorrt

    return TrtVersion.parse(str(tensorrt.__version__))


PENDING = "engine not built (TensorRT not installed), finish with: "


def pending_note(graph: str, version: TrtVersion, limits: ProfileLimits) -> str:
    """The report note of a graph whose engine is left to the device (paths relative to
    the build folder; the profile limits travel with the command)."""
    return " ".join(filter(None, (
        f"{PENDING}sfc build --from-qdq {graph}/{TRT_ONNX} -o {graph} "
        f"--target tensorrt:{version}", limits.cli_args())))


@dataclass(frozen=True)
class TensorRTTarget:
    """TensorRT engines from QDQ ONNX, for one TensorRT version.

    `version`: None means the installed TensorRT's, else 10.16. `card`/`graph` give the
    optimisation profile (None: the QDQ file's own fixed shapes, `limits.dims` for
    symbolic ones). `float_type`: the type of the float layers in the TensorRT-ready graph
    (fp16; bf16 on GPUs that have it, sm_80 on; fp32 as exported).
    """

    version: TrtVersion | None = None
    limits: ProfileLimits = field(default_factory=ProfileLimits)
    workspace_bytes: int = 1 << 30
    card: ModelCard | None = None
    graph: str | None = None
    float_type: str = "fp16"

    def __post_init__(self) -> None:
        if self.float_type not in FLOAT_TYPES:
            raise SfcError(f"unknown float type {self.float_type!r} for TensorRT (expected "
                           f"one of {', '.join(FLOAT_TYPES)})")

    @property
    def name(self) -> str:
        """Registry name."""
        return "tensorrt"

    @property
    def caps_name(self) -> str:
        """Name of the capabilities entry placement reads."""
        return "tensorrt"

    @property
    def optimization(self) -> str:
        """ESC sessions (ORT) run the QDQ graph unfused: the numerics TensorRT implements."""
        return "basic"

    def session_config(self, model: onnx.ModelProto) -> dict[str, str]:
        """ESC runs the QDQ graph unfused: nothing to configure."""
        return {}

    def for_graph(self, card: Any, graph: str) -> TensorRTTarget:
        """The profile of `graph` comes from `card`."""
        return replace(self, card=card, graph=graph)

    def resolved_version(self) -> TrtVersion:
        """The version engines are built for."""
        return self.version or installed_version() or DEFAULT_VERSION

    def lower(self, qdq_path: Path, out_dir: Path, *, stem: str = "model") -> LoweringResult:
        """Write `model.trt.onnx` and, where TensorRT is installed, `model.plan`."""
        qdq_path, out_dir = Path(qdq_path), Path(out_dir)
        if not qdq_path.is_file():
            raise SfcError(f"QDQ model not found: {qdq_path}")
        try:
            model = onnx.load(str(qdq_path))
        except Exception as exc:  # protobuf DecodeError and friends
            raise SfcError(f"{qdq_path} is not an ONNX model: {exc}") from None
        version = self.resolved_version()
        n_plugins = substitute_plugins(model)
        model, floats = lower_float(model, self.float_type)
        card = self.card or _generic_card(model, stem)
        graph = self.graph or next(iter(card.graphs))
        settings = engine_settings(model, card, graph, version, self.limits,
                                   workspace_bytes=self.workspace_bytes,
                                   timing_cache=str(out_dir.parent / TIMING_CACHE))
        notes = [f"TensorRT {version}: " + json.dumps(settings.to_dict(), sort_keys=True)]
        if n_plugins:
            notes.append(f"{n_plugins} INT2 layer(s) as the sfc::W2A16MatMul plugin")
        notes.append(floats.note())
        with staging_dir(out_dir) as stage:
            onnx.save(model, str(stage / TRT_ONNX))
        census = fusion_census(model)
        if not tensorrt_available():
            notes.append(pending_note(out_dir.name, version, self.limits))
            return LoweringResult.from_census(
                census, target=f"tensorrt:{version}", artifact=ENGINE, ort_format=None,
                bytes=artifact_bytes(out_dir / TRT_ONNX), notes=tuple(notes))
        installed = installed_version()
        if installed is not None and (installed.major, installed.minor) != (
                version.major, version.minor):
            raise SfcError(f"asked for TensorRT {version} but {installed} is installed: an "
                           "engine only runs on the version that built it")
        layers = build_engine(out_dir / TRT_ONNX, out_dir / ENGINE, settings)
        with atomic_path(out_dir / LAYERS) as tmp:
            tmp.write_text(json.dumps([vars(r) for r in layers], indent=1))
        return LoweringResult.from_census(
            census, target=f"tensorrt:{version}", artifact=ENGINE, ort_format=None,
            bytes=artifact_bytes(out_dir / ENGINE), notes=tuple(notes))


def _generic_card(model: onnx.ModelProto, stem: str) -> ModelCard:
    from ..card import graph_spec_from_onnx

    return ModelCard(name=stem, family="generic", objective="distortion",
                     graphs={"model": graph_spec_from_onnx(model, TRT_ONNX)})


def build_engine(onnx_path: Path, engine_path: Path, settings: EngineSettings) -> Any:
    """Build and save the engine for `onnx_path` as `settings` say; return its layer table.

    The only function here that calls TensorRT's builder.
    """
    import tensorrt as trt

    log = trt.Logger(trt.Logger.WARNING)
    if settings.plugins:
        from ..kernels.trt_plugin import register_plugins

        register_plugins()
    builder = trt.Builder(log)
    flags = 0
    if settings.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SfcError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors} "
                       f"(run `sfc check {onnx_path} --target tensorrt:{settings.version}`)")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    for flag in settings.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    profile = builder.create_optimization_profile()
    for p in settings.profiles:
        profile.set_shape(p.name, trt.Dims(list(p.min)), trt.Dims(list(p.opt)),
                          trt.Dims(list(p.max)))
    config.add_optimization_profile(profile)
    cache_path = Path(settings.timing_cache) if settings.timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise SfcError(f"TensorRT could not build an engine from {onnx_path} (see its log)")
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(memoryview(serialized)))
    if cache_path is not None:  # reused by the next graph and the next build
        with atomic_path(cache_path) as tmp:
            tmp.write_bytes(bytes(memoryview(cache.serialize())))
    engine = trt.Runtime(log).deserialize_cuda_engine(engine_path.read_bytes())
    inspector = engine.create_engine_inspector()
    return precision_table(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
