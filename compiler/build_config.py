"""What `sfc build` is asked to do: `BuildConfig` (recorded in each recipe and the report),
checked whole before any export or calibration, and the target it lowers with."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .calib.esc import EscCalib
from .calib.methods import method_from_name
from .calib.packing import FILL_S, GAP_S
from .errors import SfcError
from .eval.manifest import read_manifest
from .executor import check_ray_options
from .paths import BUNDLED_DATA
from .precision.activations import GuardConfig
from .precision.search import SearchConfig
from .quant.gptq import GptqConfig
from .quant.lowbit import WEIGHT_METHODS
from .quant.plan import LayerPrecision, PlanConfig, check_caps, entries_for_graph
from .quant.smooth import SmoothConfig
from .quant.spec import (
    ORT_CPU_CAPS,
    ORT_CPU_SATURATING_CAPS,
    SIM_CAPS,
    TENSORRT_CAPS,
    TargetCaps,
)
from .quant.stored import LEARNED
from .targets import OrtCpuTarget, TensorRTTarget, canonical_target, get_target
from .targets.base import Target
from .targets.tensorrt_plan import ProfileLimits

__all__ = ["BuildConfig", "target_caps", "with_limits"]

# Quantization capabilities per target; placement reads these, never the target's name.
_CAPS: dict[str, TargetCaps] = {c.name: c for c in (ORT_CPU_CAPS, ORT_CPU_SATURATING_CAPS,
                                                     SIM_CAPS, TENSORRT_CAPS)}


def target_caps(target: str) -> TargetCaps:
    """What placement may use on `target`; a one-line SfcError for an unknown one."""
    name = get_target(target).caps_name  # one-line errors for an unknown target or suffix
    if name not in _CAPS:
        raise SfcError(f"target {target!r} has no quantization capabilities yet")
    return _CAPS[name]


def _at_least(value: object, minimum: int, option: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SfcError(f"{option} must be an integer >= {minimum}, not {value!r}")


@dataclass(frozen=True)
class BuildConfig:
    """Everything `sfc build` was asked to do (recorded in each recipe and the report)."""

    target: str = "ort-cpu"
    weights: int | str = 8  # 8, 4, 2 or "mixed" (bits per layer under `search`'s budget)
    activations: int | None = 8
    calibrator: str = "esc"  # the only calibrator lossless at W8A8 on tiny.en (BENCHMARKS.md)
    calib: Path = BUNDLED_DATA / "calib"
    calib_limit: int | None = None
    recipe: Path | None = None  # a build folder or recipe.json to replay
    exclude: tuple[str, ...] = ()
    block_size: int = 32
    quantize_attention: bool = False
    symmetric_blocks: bool = False  # no zero points even where the target runs them
    # Bits of each stored 4/2-bit block scale: 32, 16 (float16 values) or 8 (codes times a
    # float16 step per column); None: 16 on ort-cpu, whose files store them (as accurate as
    # 32 on tiny.en and base, BENCHMARKS.md, and 0.5 bit a weight smaller at blocks of 32),
    # 32 where the files keep float32.
    block_scale_bits: int | None = None
    seed: int = 0
    # How sub-8-bit integers are chosen (quant.lowbit), and GPTQ's knobs.
    weight_method: str = "gptq"  # measured better than mse on tiny.en and base (BENCHMARKS.md)
    gptq: GptqConfig = field(default_factory=GptqConfig)
    # Per-layer precision written by hand (--precision FILE); the search never overrides it.
    precision: tuple[LayerPrecision, ...] = ()
    # One-stage only: more training audio (manifest folders; the teacher labels it).
    train_data: tuple[Path, ...] = ()
    # weights "mixed" only: the budget and how sensitivities are measured.
    search: SearchConfig | None = None
    # ESC only (calibrator "esc"): see sfc.calib.esc.EscCalib.
    esc_budget: int = 100
    esc_popsize: int | None = None
    esc_samples: int = 16
    esc_objective: str = "auto"
    # ESC's clips packed several to a Whisper window (`calib.packing`): the same speech in
    # a fifth of the encoder passes. The guard keeps one clip per window: its allowance is
    # nats per token on the short clips the build is checked on (packed, its KL rose by a
    # third and it kept other activations; BENCHMARKS.md, issue 13).
    pack_clips: bool = True
    # ESC's candidates and the two-stage task probes on Ray (sfc.executor): a local Ray
    # with this many workers, or the cluster at this address ("auto" or HOST:PORT).
    # Neither: in this process.
    workers: int | None = None
    ray_address: str | None = None
    # Quantized activations of a Whisper model: which ones stay float (None: no guard).
    act_guard: GuardConfig | None = field(default_factory=GuardConfig)
    # Quantized activations: their channel ranges moved into the weights first (None: not).
    smooth: SmoothConfig | None = field(default_factory=SmoothConfig)
    # TensorRT only: the dynamic-shape ranges its engines serve.
    engine_limits: ProfileLimits = field(default_factory=ProfileLimits)
    # TensorRT only: the type of the TensorRT-ready graph's float layers (`trt_float`).
    trt_float: str = "fp16"
    # ort-cpu only: float attention cores as ORT's fused MultiHeadAttention.
    fused_attention: bool = False
    # Graphs whose MatMul inputs are Hadamard-rotated before low-bit weights (quant.rotate;
    # signs from `seed`); "all": every graph.
    rotate: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # The recipe records the CPU class a plain "ort-cpu" resolved to on this machine.
        object.__setattr__(self, "target", canonical_target(self.target))
        _at_least(self.seed, 0, "--seed")
        if self.calib_limit is not None:
            _at_least(self.calib_limit, 1, "--calib-limit")
        if self.weights == "mixed":
            if self.search is None:
                raise SfcError("--weights mixed needs a budget: --avg-bits B or --size-mb S")
        elif self.search is not None:
            raise SfcError("--avg-bits, --size-mb and --candidates apply to --weights mixed only")
        if self.weight_method not in WEIGHT_METHODS:
            raise SfcError(f"--weight-method must be one of {', '.join(WEIGHT_METHODS)}, "
                           f"not {self.weight_method!r}")
        if self.train_data and not self.learns:
            raise SfcError("--train-data applies to --search one-stage and to --finetune-steps "
                           "only")
        for folder in self.train_data:
            read_manifest(folder)  # a bad manifest fails now, not after the export
        if self.gptq_start and self.weight_method != "gptq":
            raise SfcError("fine-tuning starts from GPTQ: it needs --weight-method gptq")
        if self.gptq != GptqConfig() and self.weight_method != "gptq":
            raise SfcError("--gptq-damp, --gptq-act-order and --gptq-stages apply to "
                           "--weight-method gptq only")
        if self.block_scale_bits in (16, 8):
            if not self.target.startswith("ort-cpu"):
                raise SfcError("--block-scales float16 and coded8 are for --target ort-cpu (its "
                               "files store them; sim and TensorRT files keep float32 scales)")
            if self.weights == 8 and not any(p.weights in (4, 2) for p in self.precision):
                raise SfcError("--block-scales applies to 4/2-bit weights: --weights 4, 2, "
                               "mixed, or a --precision map with 4/2-bit layers")
        # Fail on a bad option before minutes of calibration, not after.
        check_caps(self.plan_config(), target_caps(self.target))
        if self.activations is not None:
            self.calibration_method()
        esc_fields = ("esc_budget", "esc_popsize", "esc_samples", "esc_objective")
        changed = [f for f in esc_fields
                   if getattr(self, f) != self.__dataclass_fields__[f].default]
        if changed and not self.uses_esc:
            raise SfcError(f"--{changed[0].replace('_', '-')} applies to --calibrator esc only")
        if not self.pack_clips and not self.packs_esc:
            raise SfcError("--no-pack-clips applies to --calibrator esc only")
        if self.workers is not None or self.ray_address is not None:
            if not (self.uses_esc or self.probes):
                raise SfcError("--workers and --ray-address apply to --calibrator esc and "
                               "to --weights mixed's task probes only")
            check_ray_options(self.workers, self.ray_address)
        if self.act_guard not in (None, GuardConfig()) and self.activations is None:
            raise SfcError("--act-guard-kl and --act-guard-max apply to quantized activations "
                           "only (not --activations none)")
        if self.smooth not in (None, SmoothConfig()) and self.activations is None:
            raise SfcError("--smooth-alpha and --smooth-clips apply to quantized activations "
                           "only (not --activations none)")
        if self.smooth not in (None, SmoothConfig()) and self.learns:
            raise SfcError("--smooth-alpha and --smooth-clips do not apply to learned weights "
                           "(--search one-stage, --finetune-steps), which train on the "
                           "unsmoothed checkpoint")
        if self.rotate and not self.low_bit:
            raise SfcError("--rotate applies to 4/2-bit weights (--weights 4, 2, mixed, or a "
                           "--precision map with 4/2-bit layers)")
        if self.rotate and self.learns:
            raise SfcError("--rotate does not apply to learned weights (--search one-stage, "
                           "--finetune-steps), which train on the unrotated checkpoint")
        self.lowering_target()  # engine limits on a target without engines fail here

    def lowering_target(self) -> Target:
        """The target this build lowers with, carrying the engine limits where it has any."""
        return with_limits(get_target(self.target), self.engine_limits, self.trt_float,
                           self.fused_attention)

    @property
    def uses_esc(self) -> bool:
        """Whether the calibrator is ESC (a global pass over all graphs)."""
        return self.calibrator.strip().lower() == EscCalib.name

    def calibration_method(self) -> Any:
        """The calibrator's config object (MaxCalib, ..., EscCalib)."""
        if self.uses_esc:
            return method_from_name(self.calibrator, budget=self.esc_budget,
                                    popsize=self.esc_popsize, samples=self.esc_samples,
                                    objective=self.esc_objective)
        return method_from_name(self.calibrator)

    @property
    def packs_esc(self) -> bool:
        """Whether ESC calibrates this build's activations (its clips can be packed)."""
        return self.activations is not None and self.uses_esc

    @property
    def packs(self) -> bool:
        """Whether ESC's clips are packed into windows."""
        return self.pack_clips and self.packs_esc

    def rotates(self, graph: str) -> bool:
        """Whether `graph`'s MatMul inputs are rotated (`--rotate`)."""
        return graph in self.rotate or "all" in self.rotate

    @property
    def mixed(self) -> bool:
        return self.weights == "mixed"

    @property
    def smooths(self) -> bool:
        """Whether activations are smoothed first: quantized activations, and weights not
        learned (learning trains the PyTorch checkpoint, whose weights are not smoothed)."""
        return self.smooth is not None and self.activations is not None and not self.learns

    @property
    def low_bit(self) -> bool:
        """Whether the build asks for any 4/2-bit weights (uniform, mixed or per layer)."""
        return self.mixed or self.weights in (4, 2) or any(
            p.weights in (4, 2) for p in self.precision)

    @property
    def probes(self) -> bool:
        """Whether the build runs two-stage sensitivity probes against the task objective."""
        return (self.mixed and self.search is not None and self.search.method == "two-stage"
                and self.search.sensitivity == "task")

    @property
    def one_stage(self) -> bool:
        """Whether the bits are learned (`--search one-stage`, on calibration audio)."""
        return self.mixed and self.search is not None and self.search.method == "one-stage"

    @property
    def learns(self) -> bool:
        """Whether distillation learns the quantized weights (one-stage, or a two-stage
        search with fine-tuning)."""
        return self.mixed and self.search is not None and self.search.learning is not None

    @property
    def gptq_start(self) -> bool:
        """Whether the weights are fine-tuned from GPTQ's integers and scales."""
        learning = None if self.search is None else self.search.learning
        return self.mixed and learning is not None and learning.finetune_init == "gptq"

    @property
    def needs_grams(self) -> bool:
        """Whether calibration also sums each MatMul input's Gram matrix (GPTQ on 4/2-bit
        weights, and the mixed search's layer-output proxy)."""
        if self.one_stage:  # only the fine-tuning's GPTQ start needs them
            return self.gptq_start
        return self.mixed or (self.weight_method == "gptq" and self.low_bit)

    def plan_config(self, graph: str | None = None) -> PlanConfig:
        """The placement request this build makes (a mixed build plans INT8 first; the
        search's per-layer entries come on top); for one `graph`, only the precision
        entries that apply to it."""
        bits = 8 if self.weights == "mixed" else self.weights
        if not isinstance(bits, int) or isinstance(bits, bool):
            raise SfcError(f"--weights must be 8, 4, 2 or mixed, not {self.weights!r}")
        return PlanConfig(weight_bits=bits, activation_bits=self.activations,
                          block_size=self.block_size,
                          quantize_attention=self.quantize_attention, exclude=self.exclude,
                          precision=self.precision if graph is None
                          else entries_for_graph(self.precision, graph),
                          symmetric_blocks=self.symmetric_blocks,
                          block_scale_bits=self.scale_bits)

    @property
    def scale_bits(self) -> int:
        """The block scales' bits this build stores (`block_scale_bits` resolved)."""
        if self.block_scale_bits is not None:
            return self.block_scale_bits
        return 16 if self.target.startswith("ort-cpu") else 32

    def recipe_config(self, plan: PlanConfig | None = None) -> dict[str, Any]:
        """What goes into recipe.json: machine-independent settings only (`plan`: the plan
        config actually applied, when a search added per-layer entries)."""
        calib: dict[str, Any] = {"limit": self.calib_limit, "data": self.calib.name}
        if self.activations is not None:
            calib.update(self.calibration_method().to_dict())
            calib["guard"] = None if self.act_guard is None else self.act_guard.to_dict()
            calib["smoothing"] = self.smooth.to_dict() if self.smooth and self.smooths else None
            if self.packs:
                calib["packed_clips"] = {"fill_s": FILL_S, "gap_s": GAP_S}
        data = {"plan": (plan or self.plan_config()).to_dict(), "target": self.target,
                "calibration": calib}
        if self.low_bit:
            # Learned builds learn every searched weight; the convs keep absmax INT8.
            method = LEARNED if self.learns else self.weight_method
            weights: dict[str, Any] = {"method": method}
            if method == "gptq" or self.gptq_start:
                weights["gptq"] = self.gptq.to_dict()
            if self.search is not None:
                weights["search"] = self.search.to_dict()
            data["weights"] = weights
        return data


def with_limits(target: Target, limits: ProfileLimits, float_type: str = "fp16",
                fused_attention: bool = False) -> Target:
    """`target` with TensorRT profile `limits` and float-layer type (other targets have no
    dynamic-shape limits and keep the graph's float type), or ort-cpu's fused attention."""
    if fused_attention:
        if not isinstance(target, OrtCpuTarget):
            raise SfcError("--fused-attention applies to --target ort-cpu only")
        target = replace(target, fused_attention=True)
    if isinstance(target, TensorRTTarget):
        return replace(target, limits=limits, float_type=float_type)
    if limits != ProfileLimits():
        raise SfcError(f"engine limits ({limits.cli_args()}) apply to --target tensorrt only")
    if float_type != "fp16":
        raise SfcError("--trt-float applies to --target tensorrt only")
    return target
