"""ESC: evolution-strategy calibration of activation scales against a task error.

Rakotoarivony, "Evolution Strategy-Based Calibration for Low-Bit Quantization of Speech
Models" (arXiv 2603.08173): per-layer calibration picks each scale alone and ignores how
errors compound through the network, so ESC

1. local step: starts every tuned activation quantizer at its MSE scale (`MseCalib`, from
   the streamed statistics);
2. global step: refines the log-scales of ALL tuned quantizers of ALL graphs of the model
   jointly (Whisper: encoder and decoder together) with CMA-ES (`cma`), minimising a task
   objective of the fake-quantized model (`objectives.py`);
3. returns the mean of the final search distribution (`es.result.xfavorite`, as the paper),
   not the best single sample; the best sample is recorded too.

Quantizers whose consumers are outside `EscCalib.scope` keep max calibration. Candidates
are evaluated by feeding scales to sessions prepared once (`write_qdq(...,
scales_as_inputs=...)`), never by rebuilding a graph. Everything random is seeded from the
build seed: same inputs and seed give the same scales.

Departures from the paper, all visible in `EscResult`:

- the budget counts candidate evaluations and is spent in whole CMA-ES generations (a
  generation that would overrun it is not started); the MSE start and the final mean are
  evaluated once more each, outside the budget;
- the search stops early after `stall` evaluations without a new best;
- if the final mean scores worse than the MSE start, the best candidate seen (never worse
  than the start) is returned instead (`final_point == "best"`);
- Ctrl-C stops the search and returns the best-so-far scales (`interrupted=True`).

With a `checkpoints` folder, the whole search state (the CMA-ES strategy with its random
generator, the evaluations so far) is saved after every generation, keyed by everything
that determines the search; a search killed mid-way (a crash, SIGKILL, Ctrl-C) resumes
from its last whole generation and ends with the same result as an uninterrupted one.
The checkpoint is deleted when the search completes, and kept after Ctrl-C, so the same
command resumes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import pickle
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..atomic import atomic_path, write_json_atomic
from ..errors import SfcError, first_line
from ..executor import Executor, InProcess
from .methods import CalibResult, MaxCalib, MseCalib, compute_scale, register
from .stats import StatsSnapshot

__all__ = [
    "ESC_OBJECTIVES",
    "EscCalib",
    "EscResult",
    "Objective",
    "esc_search",
    "plot_trace",
    "quantizer_key",
    "split_key",
    "start_scales",
]

logger = logging.getLogger(__name__)

# What `--esc-objective` accepts; "auto" takes the model card's objective.
ESC_OBJECTIVES = ("auto", "teacher-forced", "kl", "distortion")

# scales (quantizer key -> scale) -> objective value, lower is better.
Objective = Callable[[Mapping[str, float]], float]


def quantizer_key(graph: str, tensor: str) -> str:
    """The key of one activation quantizer across all graphs of a model: "graph:tensor"."""
    return f"{graph}:{tensor}"


def split_key(key: str) -> tuple[str, str]:
    """Inverse of `quantizer_key` (graph names hold no ':')."""
    graph, sep, tensor = key.partition(":")
    if not sep or not graph or not tensor:
        raise SfcError(f"not an ESC quantizer key (graph:tensor): {key!r}")
    return graph, tensor


def _positive_int(value: Any, label: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SfcError(f"ESC {label} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class EscCalib:
    """ESC settings (recorded in the recipe).

    `budget`: candidate evaluations of the search. `sigma0`: initial CMA-ES step in
    log-scale (0.1 ~ +-10% per scale). `popsize`: CMA-ES population (None: cma's default
    4 + 3 ln n). `samples`: calibration items the objective runs on. `objective`: one of
    ESC_OBJECTIVES. `scope`: consumer op types whose input quantizers are tuned (the rest
    keep max calibration). `stall`: stop after this many evaluations without a new best.
    """

    budget: int = 100
    sigma0: float = 0.1
    popsize: int | None = None
    samples: int = 16
    objective: str = "auto"
    scope: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
    stall: int = 30
    name: ClassVar[str] = "esc"

    def __post_init__(self) -> None:
        _positive_int(self.budget, "budget")
        s = self.sigma0
        if isinstance(s, bool) or not isinstance(s, int | float) or not (
            math.isfinite(s) and 0.0 < s <= 5.0
        ):
            raise SfcError(f"ESC sigma0 must be a number in (0, 5], got {s!r}")
        object.__setattr__(self, "sigma0", float(s))
        if self.popsize is not None:
            _positive_int(self.popsize, "popsize", 4)
        _positive_int(self.samples, "samples")
        _positive_int(self.stall, "stall")
        if self.objective not in ESC_OBJECTIVES:
            raise SfcError(f"ESC objective must be one of {', '.join(ESC_OBJECTIVES)}, "
                           f"got {self.objective!r}")
        scope = self.scope
        if isinstance(scope, str) or not isinstance(scope, tuple | list) or not scope or not all(
            isinstance(op, str) and op for op in scope
        ):
            raise SfcError(f"ESC scope must be a non-empty list of op types, got {scope!r}")
        object.__setattr__(self, "scope", tuple(scope))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description for the recipe."""
        return {"method": self.name, "budget": self.budget, "sigma0": self.sigma0,
                "popsize": self.popsize, "samples": self.samples, "objective": self.objective,
                "scope": list(self.scope), "stall": self.stall}


@register(EscCalib)
def _esc_threshold(stats: StatsSnapshot, config: EscCalib, bits: int) -> float:
    raise SfcError("ESC tunes all activation scales of a model jointly; it has no per-tensor "
                   "threshold (use `sfc build --calibrator esc`, or sfc.calib.esc)")


@dataclass(frozen=True)
class EscResult:
    """What an ESC search found. Scales are keyed by `quantizer_key(graph, tensor)`.

    `scales`: the final scales (the mean of the final distribution, or the best candidate:
    see `final_point`); `start`: the MSE scales the search started from; `best`: the best
    candidate seen (the start if none beat it). `trace[i]`: best objective after evaluation
    i + 1; `values[i]`: objective of evaluation i + 1. `final_objective`: objective of
    `scales` (evaluated once; on interruption, the best-so-far objective).
    """

    scales: dict[str, float]
    start: dict[str, float]
    best: dict[str, float]
    objective: str
    start_objective: float
    best_objective: float
    final_objective: float
    final_point: str  # "mean", "best" (mean scored worse than the start), "interrupted"
    trace: tuple[float, ...]
    values: tuple[float, ...]
    evaluations: int
    generations: int
    seconds: float
    interrupted: bool
    seed: int
    config: dict[str, Any] = field(default_factory=dict)

    def ratios(self) -> dict[str, float]:
        """Final scale over MSE start scale, per quantizer."""
        return {k: self.scales[k] / self.start[k] for k in self.start}

    def to_dict(self) -> dict[str, Any]:
        """The versioned JSON envelope."""
        data = {
            "scales": dict(self.scales), "start": dict(self.start), "best": dict(self.best),
            "objective": self.objective, "start_objective": self.start_objective,
            "best_objective": self.best_objective, "final_objective": self.final_objective,
            "final_point": self.final_point, "trace": list(self.trace),
            "values": list(self.values), "evaluations": self.evaluations,
            "generations": self.generations, "seconds": self.seconds,
            "interrupted": self.interrupted, "seed": self.seed, "config": dict(self.config),
        }
        return {"_type": "EscResult", "_version": 1, "_data": data}

    @classmethod
    def from_dict(cls, envelope: Any) -> EscResult:
        """Inverse of `to_dict`."""
        if not isinstance(envelope, dict) or envelope.get("_type") != "EscResult" or \
                envelope.get("_version") != 1:
            raise SfcError("not a version-1 ESC result")
        d = dict(envelope["_data"])
        d["trace"], d["values"] = tuple(d["trace"]), tuple(d["values"])
        try:
            return cls(**d)
        except TypeError as exc:
            raise SfcError(f"malformed ESC result: {exc}") from None

    def save(self, path: Path) -> None:
        """Write the JSON atomically."""
        write_json_atomic(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: Path) -> EscResult:
        """Read a result written by `save`."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise SfcError(f"cannot read ESC result {path}: {exc}") from None


# ---------------------------------------------------------------- local step


def start_scales(stats: Mapping[str, StatsSnapshot], op_types: Mapping[str, Sequence[str]],
                 config: EscCalib, bits: int = 8) -> dict[str, tuple[CalibResult, bool]]:
    """Per activation tensor: its start scale and whether ESC tunes it.

    Tensors read by at least one op in `config.scope` start at their MSE scale and are
    tuned; the others get (and keep) their max scale. `op_types`: tensor -> the op types
    of its quantized consumers (`Quantizer.op_types`).
    """
    out = {}
    for tensor, snap in stats.items():
        tuned = any(op in config.scope for op in op_types[tensor])
        method = MseCalib() if tuned else MaxCalib()
        out[tensor] = (compute_scale(snap, method, bits), tuned)
    return out


# ---------------------------------------------------------------- global step


def _cma_seed(seed: int) -> int:
    """A positive 31-bit cma seed derived from the build seed (cma treats 0 as 'random')."""
    digest = hashlib.sha256(f"sfc-esc:{seed}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % (2**31 - 2) + 1


class _Normal:
    """cma's `randn`: standard normals from a seeded numpy Generator. An object, not a
    closure, so the strategy pickles together with its generator's `bit_generator.state`
    and a resumed search draws the numbers an uninterrupted one would."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


class _Tracker:
    """Counts evaluations; keeps the best point, the traces, and the stall counter."""

    def __init__(self, keys: list[str], start_x: np.ndarray, start_value: float, bar: Any,
                 task: Any) -> None:
        self.keys = keys
        self.best_x, self.best_value = start_x.copy(), start_value
        self.trace: list[float] = []
        self.values: list[float] = []
        self.since_best = 0
        self.bar, self.task = bar, task

    def scales(self, x: np.ndarray) -> dict[str, float]:
        return {k: float(math.exp(v)) for k, v in zip(self.keys, x, strict=True)}

    def record(self, x: np.ndarray, value: float) -> float:
        """Count the evaluation of `x` at `value`; the value as recorded (inf if not
        finite)."""
        if not math.isfinite(value):
            value = math.inf  # ranked last; cma is told a large finite value below
        self.values.append(value)
        if value < self.best_value:
            self.best_x, self.best_value, self.since_best = x.copy(), value, 0
        else:
            self.since_best += 1
        self.trace.append(self.best_value)
        if self.bar is not None:
            self.bar.update(self.task, advance=1, best=f"{self.best_value:.5g}")
        return value

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the tracker."""
        return {"best_x": self.best_x.copy(), "best_value": self.best_value,
                "since_best": self.since_best, "values": list(self.values),
                "trace": list(self.trace)}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Inverse of `state` (ValueError when it does not fit this search)."""
        best_x = np.asarray(state["best_x"], dtype=np.float64)
        values, trace = [float(v) for v in state["values"]], [float(v) for v in state["trace"]]
        if best_x.shape != self.best_x.shape or len(values) != len(trace):
            raise ValueError("the saved evaluations do not fit this search")
        self.best_x, self.best_value = best_x, float(state["best_value"])
        self.since_best, self.values, self.trace = int(state["since_best"]), values, trace
        if self.bar is not None:
            self.bar.update(self.task, completed=len(values), best=f"{self.best_value:.5g}")


_CHECKPOINT_VERSION = 1


def _checkpoint_key(start: Mapping[str, float], objective_name: str, config: EscCalib,
                    seed: int, identity: str) -> str:
    """sha256 of everything that determines a search: its start (keys and scales), the
    objective, the settings, the seed, the caller's `identity` of what the objective
    measures, and cma's version (the checkpoint pickles a cma object)."""
    import cma

    what = [_CHECKPOINT_VERSION, cma.__version__, [[k, float(v)] for k, v in start.items()],
            objective_name, config.to_dict(), seed, identity]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()


def _resume(path: Path, key: str, track: _Tracker, popsize: int) -> dict[str, Any] | None:
    """Restore `track` from the state saved at `path` for the search `key`; that state (its
    "es", "generations", "start_value", "seconds"), or None when there is none, it belongs
    to another search, or it cannot be read (then with a warning: a damaged checkpoint
    only costs the evaluations again, never the build)."""
    import cma

    if not path.is_file():
        return None
    try:
        # Pickle runs code while loading: acceptable only because this is a file sfc itself
        # wrote into its own cache, never a user-supplied path. It keeps cma's strategy
        # exactly (covariance, paths, histories), which no array form of ours would.
        state = pickle.loads(path.read_bytes())
        if not isinstance(state, dict) or state.get("version") != _CHECKPOINT_VERSION:
            raise ValueError("not an ESC checkpoint")
        if state.get("key") != key:
            return None
        if not isinstance(state["es"], cma.CMAEvolutionStrategy) or \
                state["es"].popsize != popsize:
            raise ValueError("the saved strategy does not fit this search")
        track.restore(state["tracker"])
        return state | {"generations": int(state["generations"]),
                        "start_value": float(state["start_value"]),
                        "seconds": float(state["seconds"])}
    except Exception as exc:  # a damaged pickle can raise nearly any exception
        logger.warning("ignoring the unreadable ESC checkpoint %s: %s", path, first_line(exc))
        return None


def esc_search(start: Mapping[str, float], objective: Objective, config: EscCalib,
               seed: int, *, objective_name: str = "", progress: bool = True,
               checkpoints: Path | None = None, identity: str = "",
               executor: Executor | None = None) -> EscResult:
    """Refine `start` scales (quantizer key -> scale > 0) with CMA-ES on `objective`.

    The search space is the vector of log-scales; CMA-ES starts at log(start) with step
    `config.sigma0`. See the module docstring for the budget, stall and interruption rules.
    A KeyboardInterrupt raised during an evaluation ends the search with the best-so-far
    scales and `interrupted=True`.

    `checkpoints`: the folder of resumable search states (one file per search); `identity`
    must name everything else `objective` depends on (models, data), since a saved state
    is resumed when the start, objective name, settings, seed and identity all match.
    `seconds` then adds up the wall time of every run that led to the result.

    `executor`: evaluates each generation's candidates (`sfc.executor`: Ray workers, say),
    its values taken in the candidates' order; default: `objective`, here. The MSE start and
    the final mean are evaluated with `objective`.
    """
    import cma
    from rich.progress import TextColumn

    from ..progress import progress_bar

    keys = list(start)
    if not keys:
        raise SfcError("ESC has no activation quantizer to tune")
    x0 = np.array([math.log(start[k]) for k in keys], dtype=np.float64)
    if not np.isfinite(x0).all():
        raise SfcError("ESC start scales must be finite and > 0")
    began = time.perf_counter()
    options: dict[str, Any] = {
        "seed": _cma_seed(seed), "maxfevals": config.budget, "verbose": -9,
        "randn": _Normal(_cma_seed(seed)),
    }
    if config.popsize is not None:
        options["popsize"] = config.popsize
    # cma refuses 1-D problems: one scale is searched with an ignored second coordinate.
    x0_cma = np.append(x0, 0.0) if len(keys) == 1 else x0
    es = cma.CMAEvolutionStrategy(x0_cma, config.sigma0, options)
    popsize = int(es.popsize)

    if config.budget < popsize:
        raise SfcError(f"ESC budget {config.budget} is below one CMA-ES generation "
                       f"({popsize} candidates for {len(keys)} scales): raise the budget or "
                       "lower the population size")
    key = _checkpoint_key({k: start[k] for k in keys}, objective_name, config, seed, identity)
    path = None if checkpoints is None else Path(checkpoints) / f"esc-{key[:24]}.pkl"
    bar = progress_bar(TextColumn("best {task.fields[best]}"), enabled=progress)
    task = bar.add_task(f"ESC ({objective_name or 'objective'}, {len(keys)} scales)",
                        total=config.budget, best="-")
    interrupted = False
    generations = 0
    earlier = 0.0  # wall seconds of the runs this one resumes

    def save() -> None:
        """The state after a whole generation, replacing the previous one atomically."""
        if path is not None:
            state = {"version": _CHECKPOINT_VERSION, "key": key, "es": es,
                     "tracker": track.state(), "generations": generations,
                     "start_value": start_value,
                     "seconds": earlier + time.perf_counter() - began}
            with atomic_path(path) as tmp:
                tmp.write_bytes(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))

    runner = InProcess(objective) if executor is None else executor
    with bar:
        track = _Tracker(keys, x0, math.nan, bar, task)
        saved = None if path is None else _resume(path, key, track, popsize)
        if saved is not None:
            es, generations = saved["es"], saved["generations"]
            start_value, earlier = saved["start_value"], saved["seconds"]
            logger.warning("resuming ESC from checkpoint: %d evaluations done",
                           len(track.values))
        else:
            # Ctrl-C here is an ordinary interruption: nothing has been found yet.
            start_value = float(objective({k: float(start[k]) for k in keys}))
            if not math.isfinite(start_value):
                raise SfcError(f"ESC objective at the MSE start is {start_value}")
            track = _Tracker(keys, x0, start_value, bar, task)
            bar.update(task, best=f"{start_value:.5g}")
        try:
            # The stop tests run before each generation but the first, so a search resumed
            # from the state saved after a generation makes the same decision.
            while True:
                if generations and track.since_best >= config.stall:
                    logger.info("ESC: no improvement in %d evaluations; stopping",
                                track.since_best)
                    break
                if generations and es.stop():
                    logger.info("ESC: cma stopped (%s)", es.stop())
                    break
                if len(track.values) + popsize > config.budget:
                    break
                candidates = es.ask()
                xs = [np.asarray(c[: len(keys)]) for c in candidates]
                values = [track.record(x, float(v)) for x, v in zip(
                    xs, runner.evaluate([track.scales(x) for x in xs]), strict=True)]
                worst = max((v for v in values if math.isfinite(v)), default=1e30)
                es.tell(candidates, [v if math.isfinite(v) else 10.0 * abs(worst) + 1.0
                                     for v in values])
                generations += 1
                save()
        except KeyboardInterrupt:
            interrupted = True  # the checkpoint stays: the same command resumes
    best = track.scales(track.best_x)
    if interrupted:
        scales, final_value, final_point = best, track.best_value, "interrupted"
    else:
        mean = np.asarray(es.result.xfavorite)[: len(keys)]
        scales, final_point = track.scales(mean), "mean"
        final_value = float(objective(scales))
        if not final_value <= start_value:
            logger.warning("ESC: the final mean scores %.5g, worse than the MSE start %.5g; "
                           "keeping the best candidate (%.5g)", final_value, start_value,
                           track.best_value)
            scales, final_value, final_point = best, track.best_value, "best"
        if path is not None:
            path.unlink(missing_ok=True)  # the search is complete: nothing to resume
    return EscResult(
        scales=scales, start={k: float(start[k]) for k in keys}, best=best,
        objective=objective_name, start_objective=start_value,
        best_objective=track.best_value, final_objective=final_value,
        final_point=final_point, trace=tuple(track.trace), values=tuple(track.values),
        evaluations=len(track.values), generations=generations,
        seconds=earlier + time.perf_counter() - began, interrupted=interrupted, seed=seed,
        config=config.to_dict() | {"popsize_used": popsize},
    )


# ---------------------------------------------------------------- plot


def plot_trace(result: EscResult, path: Path) -> Path:
    """Write a PNG of the objective per evaluation and the best so far (matplotlib, Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..atomic import atomic_path

    fig = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    n = np.arange(1, len(result.values) + 1)
    finite = [v if math.isfinite(v) else np.nan for v in result.values]
    ax.plot(n, finite, ".", color="0.6", label="candidate")
    ax.plot(n, result.trace, "-", color="C0", label="best so far")
    ax.axhline(result.start_objective, color="C3", ls="--", label="MSE start")
    ax.axhline(result.final_objective, color="C2", ls=":",
               label=f"final ({result.final_point})")
    ax.set_xlabel("evaluation")
    ax.set_ylabel(result.objective or "objective")
    ax.set_title(f"ESC: {result.start_objective:.4g} -> {result.final_objective:.4g} "
                 f"({result.evaluations} evaluations, {result.seconds:.0f} s)")
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
