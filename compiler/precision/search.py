"""Two-stage mixed precision: per-weight options, sensitivities, the integer program.

Stage 1 measures, for every weight the plan quantizes and every candidate format it can
take on the target, the task-loss increase when only that weight takes that format
(`probe`), or the cheaper layer-output proxy. Stage 2 picks one format per weight with
the least summed sensitivity under the budget (`solve`). The result is a tuple of
`LayerPrecision` entries (exact node names) that the ordinary planner applies, so a mixed
build goes through the same plan, recipe, QDQ writer and targets as a uniform one.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from scipy.stats import spearmanr

from ..atomic import write_json_atomic
from ..errors import SfcError
from ..executor import Executor, ObjectiveFactory
from ..progress import progress_bar
from ..quant.plan import (
    LayerPrecision,
    Plan,
    PlanConfig,
    exact_pattern,
    gather_copy_spec,
    make_plan,
)
from ..quant.spec import QuantSpec, TargetCaps
from ..quant.weights import Rounded, round_to_nearest
from .budget import Budget, WeightOption, parse_format, storage_bits
from .onestage import OneStageConfig
from .probe import ProbeGraph, output_error, run_probes, switchable
from .solve import solve_choice

__all__ = ["DEFAULT_CANDIDATES", "RESULT_FILE", "SEARCH_METHODS", "SENSITIVITIES",
           "GraphWeights", "LayerChoice", "SearchConfig", "SearchResult", "candidate_specs",
           "check_budget", "choose", "float_params"]

DEFAULT_CANDIDATES = ("8", "4/32", "4/128", "2/32")
SENSITIVITIES = ("task", "proxy")
SEARCH_METHODS = ("two-stage", "one-stage")
RESULT_FILE = "precision.json"


@dataclass(frozen=True)
class SearchConfig:
    """How a mixed build picks bits: the budget, candidate formats, the sensitivity
    measure ("task": probes against the task objective; "proxy": layer-output error) and
    the calibration items the probes run on; or, with `method` "one-stage", the learned
    search of `onestage` with its `one_stage` settings (sensitivity and samples unused).
    `finetune` (two-stage only): once the probes and the program have fixed the formats,
    fine-tune the weights at them by distillation (`onestage` with 0 search steps)."""

    budget: Budget
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES
    sensitivity: str = "task"
    samples: int = 16
    method: str = "two-stage"
    one_stage: OneStageConfig = field(default_factory=OneStageConfig)
    finetune: OneStageConfig | None = None

    def __post_init__(self) -> None:
        if not self.candidates:
            raise SfcError("--candidates needs at least one format")
        formats = [parse_format(c) for c in self.candidates]
        if len(set(formats)) != len(formats):
            raise SfcError("--candidates lists a format twice")
        if self.sensitivity not in SENSITIVITIES:
            raise SfcError(f"--sensitivity must be task or proxy, not {self.sensitivity!r}")
        if not isinstance(self.samples, int) or self.samples < 1:
            raise SfcError(f"--sensitivity-samples must be >= 1, not {self.samples!r}")
        if self.method not in SEARCH_METHODS:
            raise SfcError(f"--search must be {' or '.join(SEARCH_METHODS)}, not "
                           f"{self.method!r}")
        if self.finetune is not None and (self.method != "two-stage" or self.finetune.steps):
            raise SfcError("a two-stage search's fine-tuning has 0 search steps (one-stage "
                           "fine-tunes in its own run)")

    @property
    def learning(self) -> OneStageConfig | None:
        """The settings of the distillation that learns the weights, if any (one-stage's
        search and fine-tuning, or two-stage's fine-tuning)."""
        return self.one_stage if self.method == "one-stage" else self.finetune

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.budget.to_dict(), "candidates": list(self.candidates)}
        if self.method == "one-stage":
            return {**out, "method": self.method, "one_stage": self.one_stage.to_dict()}
        out.update(sensitivity=self.sensitivity, samples=self.samples)
        return out if self.finetune is None else {**out, "finetune": self.finetune.to_dict()}


@dataclass(frozen=True)
class LayerChoice:
    """One weight's options and the one chosen (for the report and recipe)."""

    graph: str
    tensor: str
    consumers: tuple[str, ...]
    params: int
    options: tuple[dict[str, Any], ...]  # label, bits, sensitivity, proxy
    chosen: int

    @property
    def label(self) -> str:
        return str(self.options[self.chosen]["label"])


@dataclass(frozen=True)
class SearchResult:
    config: SearchConfig
    objective: str
    fp32_objective: float
    bits_allowed: float
    params: int
    other_bytes: int
    layers: tuple[LayerChoice, ...]
    spearman: float | None
    seconds: float
    float_bits: int = 0  # bits the search does not choose (float weights; one-stage: convs too)
    rounds: tuple[dict[str, Any], ...] = ()  # verification of the chosen mix (`_verified`)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per part (one-stage)

    @property
    def bits_used(self) -> int:
        return self.float_bits + sum(int(c.options[c.chosen]["bits"]) for c in self.layers)

    @property
    def avg_bits(self) -> float:
        return self.bits_used / self.params

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "objective": self.objective,
                "fp32_objective": self.fp32_objective, "bits_allowed": self.bits_allowed,
                "bits_used": self.bits_used, "params": self.params,
                "avg_bits": self.avg_bits, "other_bytes": self.other_bytes,
                "est_mb": (self.other_bytes + self.bits_used / 8) / 1e6,
                "spearman_task_vs_proxy": self.spearman, "seconds": self.seconds,
                "rounds": list(self.rounds), "phase_seconds": self.phases,
                "layers": [{"graph": c.graph, "tensor": c.tensor,
                            "consumers": list(c.consumers), "params": c.params,
                            "options": list(c.options), "chosen": c.label}
                           for c in self.layers]}

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.to_dict())

    def entries(self) -> dict[str, tuple[LayerPrecision, ...]]:
        """graph -> the precision entries that give each weight its chosen format."""
        out: dict[str, list[LayerPrecision]] = {}
        for c in self.layers:
            bits, block = parse_format(c.label)
            out.setdefault(c.graph, []).extend(
                LayerPrecision(exact_pattern(n), weights=bits, block_size=block)
                for n in c.consumers)
        return {g: tuple(v) for g, v in out.items()}


def candidate_specs(model: onnx.ModelProto, base: PlanConfig, caps: TargetCaps,
                    candidates: Sequence[str]) -> tuple[Plan, dict[str, list[QuantSpec]]]:
    """The base plan and, per weight it quantizes, the distinct specs the candidate
    formats give it on this target (placement rules decide: fallbacks and user entries
    included), in candidate order."""
    plans = []
    for text in candidates:
        bits, block = parse_format(text)
        plans.append(make_plan(model, replace(base, weight_bits=bits,
                                              block_size=block or base.block_size), caps))
    base_plan = make_plan(model, base, caps)
    specs: dict[str, list[QuantSpec]] = {}
    for q in base_plan.weights:
        found: list[QuantSpec] = []
        for plan in plans:
            cand = plan.get(q.tensor)
            if cand is not None and cand.spec not in found:
                found.append(cand.spec)
        specs[q.tensor] = found or [q.spec]
    return base_plan, specs


def float_params(model: onnx.ModelProto, plan: Plan) -> tuple[int, int]:
    """(params of weights a precision entry keeps float, bytes of every other initializer
    that the plan does not quantize)."""
    quantized = {q.tensor for q in plan.weights}
    kept = set()
    for s in plan.skipped:
        if s.reason.startswith("kept float by precision entry"):
            node = next(n for n in model.graph.node if n.name == s.node)
            kept.add(node.input[1])
    params, other = 0, 0
    for init in model.graph.initializer:
        size = math.prod(init.dims)
        if init.name in kept:
            params += size
        elif init.name not in quantized:
            other += size * numpy_helper.to_array(init).itemsize
    return params, other


def check_budget(graphs: Sequence[tuple[onnx.ModelProto, Plan, Mapping[str, list[QuantSpec]]]],
                 budget: Budget) -> None:
    """SfcError when no choice of the candidate formats fits `budget` (before any
    calibration or probe): (model, plan, weight -> specs) per graph."""
    params = other = floor = 0
    for model, plan, specs in graphs:
        shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
        kept, rest = float_params(model, plan)
        params, other, floor = params + kept, other + rest, floor + 32 * kept
        for q in plan.weights:
            params += math.prod(shapes[q.tensor])
            floor += min(storage_bits(shapes[q.tensor], s) for s in specs[q.tensor])
    allowed = budget.bits_allowed(params, other)
    if floor > allowed:
        need = (f"--avg-bits {math.ceil(100 * floor / params) / 100:g}"
                if budget.avg_bits is not None
                else f"--size-mb {math.ceil((other + floor / 8) / 1e4) / 100:g}")
        raise SfcError(f"the budget is below the smallest choice of the candidate formats on "
                       f"this target: {need} at least (or add smaller --candidates)")


@dataclass
class GraphWeights:
    """What the search needs of one graph (prepared by the build)."""

    name: str
    model: onnx.ModelProto
    plan: Plan
    specs: dict[str, list[QuantSpec]]
    grams: Mapping[str, Any]  # weight tensor -> GramAccumulator of its MatMul input
    quantize: Callable[[str, QuantSpec], tuple[np.ndarray, np.ndarray, str]]
    caps: TargetCaps  # the target's: which formats give Gathers their own copy

    def gather_specs(self, tensor: str) -> list[QuantSpec | None]:
        """Per candidate format of `tensor`, the spec of its Gathers' own copy (or None)."""
        return [gather_copy_spec(self.model.graph, tensor, spec, self.caps)
                for spec in self.specs[tensor]]


def _key(graphs: Sequence[GraphWeights], config: SearchConfig, extra: str) -> str:
    """What the probes depend on: models, options, samples, method (not the budget, so
    a build at another budget reuses them)."""
    h = hashlib.sha256(json.dumps([list(config.candidates), config.samples]).encode()
                       + extra.encode())
    for g in graphs:
        h.update(g.model.SerializeToString(deterministic=True))
        h.update(repr(sorted((t, [s.to_dict() for s in v]) for t, v in g.specs.items()))
                 .encode())
        copies = {t: [c.to_dict() if c else None for c in g.gather_specs(t)] for t in g.specs}
        if any(any(v) for v in copies.values()):  # keeps earlier probe files' keys otherwise
            h.update(repr(sorted(copies.items())).encode())
    return h.hexdigest()


def choose(graphs: Sequence[GraphWeights], config: SearchConfig,
           make_spec: Callable[[dict[str, ProbeGraph]], ObjectiveFactory],
           probes_dir: Path | None = None, method_key: str = "",
           open_executor: Callable[[ObjectiveFactory], Executor | None] = lambda spec: None,
           ) -> SearchResult:
    """Measure sensitivities and solve for one format per weight under the budget.

    `make_spec(graph -> its probe graph)`: the spec of the task objective
    over all graphs (the build's, as ESC uses). `probes_dir`: where probe results are kept,
    one file per model/options/method, so an interrupted search resumes and another
    budget costs no probes. `open_executor(spec)`: where the probes run (None: here); the
    whole-mix checks run here.
    """
    started = time.perf_counter()
    options: dict[str, list[WeightOption]] = {}
    meta: dict[str, tuple[str, Any, int]] = {}
    proxies: dict[str, list[float | None]] = {}
    formats: dict[str, dict[str, list[Rounded]]] = {}
    gathered: dict[str, dict[str, list[Rounded]]] = {}
    params = other = kept_params = 0
    bar = progress_bar(transient=True)
    bar.start()
    task = bar.add_task("precision: candidate weights",
                        total=sum(len(g.plan.weights) for g in graphs))
    for g in graphs:
        inits = {t.name: t for t in g.model.graph.initializer}
        kept, rest = float_params(g.model, g.plan)
        params, other, kept_params = params + kept, other + rest, kept_params + kept
        formats[g.name], gathered[g.name] = {}, {}
        for q in bar.track(g.plan.weights, task_id=task):
            w = numpy_helper.to_array(inits[q.tensor])
            key = f"{g.name}:{q.tensor}"
            meta[key] = (g.name, q, w.size)
            params += w.size
            opts, prox, rs, grs = [], [], [], []
            copies: dict[QuantSpec, Rounded] = {}  # one per Gather copy spec
            for spec, copy in zip(g.specs[q.tensor], g.gather_specs(q.tensor), strict=True):
                ints, scales, _ = g.quantize(q.tensor, spec)
                rounded = Rounded(ints, spec, scales)
                gram = g.grams.get(q.tensor)
                prox.append(None if gram is None else
                            output_error(rounded.array() - w, gram.gram, gram.count))
                opts.append(WeightOption(spec, storage_bits(w.shape, spec)))
                rs.append(rounded)
                if copy is not None and copy not in copies:
                    g_ints, g_scales = round_to_nearest(w, copy, "absmax")
                    copies[copy] = Rounded(g_ints, copy, g_scales)
                grs.append(rounded if copy is None else copies[copy])
            options[key], proxies[key] = opts, prox
            if len(opts) > 1:
                formats[g.name][q.tensor] = rs
                if copies:
                    gathered[g.name][q.tensor] = grs
    # Weights a precision entry keeps float are fixed: in the average at 32 bits each.
    bar.stop()
    float_bits = kept_params * 32
    bits_allowed = config.budget.bits_allowed(params, other) - float_bits
    objective_name, fp32 = "proxy", 0.0
    rounds: list[dict[str, Any]] = []
    if config.sensitivity == "task" and any(formats.values()):
        built = {g.name: switchable(g.model, formats[g.name], gathered[g.name])
                 for g in graphs}
        gates = {g.name: {t: [n for n in built[g.name].gates if n.startswith(f"{t}__probe")]
                          for t in formats[g.name]} for g in graphs}
        factory = make_spec(built)
        objective = factory.make()
        executor = None
        try:
            objective_name = objective.name
            key = _key(graphs, config, method_key)
            checkpoint = None if probes_dir is None else probes_dir / f"{key[:32]}.json"
            executor = open_executor(factory)
            # The sessions (here, and on the workers) hold the probe graphs now; their
            # protos would stay beside them, a copy of the model, through every probe.
            del built, factory
            fp32, losses = run_probes(objective, gates, checkpoint, key, executor=executor)
            for gname, weights in losses.items():
                for tensor, values in weights.items():
                    key = f"{gname}:{tensor}"
                    options[key] = [replace(o, sensitivity=v)
                                    for o, v in zip(options[key], values, strict=True)]
            picked, rounds = _verified(options, bits_allowed, objective, gates, fp32)
        finally:
            if executor is not None:
                executor.close()
            objective.close()
    else:
        for key, opts in options.items():
            options[key] = [replace(o, sensitivity=p or 0.0)
                            for o, p in zip(opts, proxies[key], strict=True)]
        picked = solve_choice(options, bits_allowed)
    layers = []
    task_vals, proxy_vals = [], []
    for key, opts in options.items():
        gname, q, size = meta[key]
        rows = []
        for o, p in zip(opts, proxies[key], strict=True):
            rows.append({"label": o.label, "bits": o.bits, "sensitivity": o.sensitivity,
                         "proxy": p})
            if len(opts) > 1 and p is not None and config.sensitivity == "task":
                task_vals.append(o.sensitivity)
                proxy_vals.append(p)
        layers.append(LayerChoice(gname, q.tensor, q.consumers, size, tuple(rows), picked[key]))
    rho = None
    if len(task_vals) > 2:
        rho = float(spearmanr(task_vals, proxy_vals).statistic)
    return SearchResult(config, objective_name, fp32, bits_allowed + float_bits, params,
                        other, tuple(layers), rho, time.perf_counter() - started, float_bits,
                        tuple(rounds))


# Rounds of measuring the chosen mix as a whole and correcting the additive model.
VERIFY_ROUNDS = 4
_TOLERANCE = 1.5  # measured / predicted loss accepted without a correction


def _below_4(option: WeightOption) -> bool:
    return option.spec is not None and option.spec.bits < 4


def _verified(options: dict[str, list[WeightOption]], bits_allowed: float,
              objective: Callable[[Mapping[str, float]], float],
              gates: Mapping[str, Mapping[str, Sequence[str]]], fp32: float
              ) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """The program's choice, checked on the task objective with every chosen format at
    once. Single-weight probes add up only while errors stay small: many 2-bit layers
    together cost more than the sum of their probes. When the measured loss exceeds the
    prediction by more than `_TOLERANCE`x, the sub-4-bit options' sensitivities are scaled
    by measured / predicted and the program solved again; the choice with the least
    measured loss among the rounds is kept (every round meets the budget)."""
    from ..calib.esc import quantizer_key

    def measure(picked: dict[str, int], what: str) -> float:
        feed = {quantizer_key(g, gate): 0.0 for g, ws in gates.items()
                for names in ws.values() for gate in names}
        for key, k in picked.items():
            g, tensor = key.split(":", 1)
            names = gates.get(g, {}).get(tensor)
            if names:
                feed[quantizer_key(g, names[k])] = 1.0
        measured = float(objective(feed)) - fp32
        rounds.append({"choice": what, "measured": measured,
                       "predicted": sum(options[k][i].sensitivity for k, i in picked.items()),
                       "sub4bit_weights": sum(_below_4(options[k][i])
                                              for k, i in picked.items())})
        tried.append((measured, picked))
        return measured

    current = {k: list(v) for k, v in options.items()}
    rounds: list[dict[str, Any]] = []
    tried: list[tuple[float, dict[str, int]]] = []
    for i in range(VERIFY_ROUNDS):
        picked = solve_choice(current, bits_allowed)
        measured = measure(picked, f"program, round {i + 1}")
        predicted, low = rounds[-1]["predicted"], rounds[-1]["sub4bit_weights"]
        if low == 0 or measured <= _TOLERANCE * max(predicted, 1e-12):
            break
        ratio = measured / max(predicted, 1e-12)
        current = {k: [replace(o, sensitivity=o.sensitivity * ratio) if _below_4(o) else o
                       for o in v] for k, v in current.items()}
    # Every uniform format that fits the budget competes too, so the mixed choice is never
    # worse than uniform on the measured objective.
    def cheapest(v: list[WeightOption]) -> int:
        return min(range(len(v)), key=lambda j: v[j].bits)

    for label in dict.fromkeys(o.label for v in options.values() for o in v):
        uniform = {k: next((j for j, o in enumerate(v) if o.label == label), cheapest(v))
                   for k, v in options.items()}
        if sum(options[k][j].bits for k, j in uniform.items()) <= bits_allowed:
            measure(uniform, f"uniform {label}")
    best = min(range(len(tried)), key=lambda j: tried[j][0])
    for j, r in enumerate(rounds):
        r["kept"] = j == best
    return tried[best][1], rounds

