"""One-stage mixed precision: bit-widths learned together with the quantized weights.

After arXiv 2501.03643. Each searched weight keeps one FP32 latent tensor and one
learnable scale tensor per candidate format (the build's candidates: 8, 4/32, 4/128 and
2/32 unless `--candidates` says otherwise), each candidate
fake-quantized in the exact layout the QDQ writer stores (`fakequant`). A step mixes the
candidates with Gumbel-softmax weights over learnable per-weight logits at an annealed
temperature; the loss is the caller's task loss (distillation to the FP32 teacher) plus an
augmented-Lagrangian size term on the expected average bits over the budget, whose
multiplier rises while the budget is exceeded: at the end every weight's task gain per
bit is weighed against one price, so insensitive weights give their bits to sensitive
ones. The search then fixes each weight's format (the most probable assignment within
the budget, by the same integer program as the two-stage search, then its unspent bits
given to the least improbable upgrades) and fine-tunes weights
and scales with the bits fixed, from the caller's starting point (the build's: GPTQ at
the chosen formats) or from the search's own latents.
The export is integers and scales per weight: `quantize_weight` of the learned latent
weight at the learned scale, which is bit for bit the fake-quantized forward value.

Model-agnostic: the caller maps weights to its model in `task_loss(step, weights)`.
Resumable: a checkpoint (latents, scales, logits, optimizer, Gumbel generator, history)
is written every `checkpoint_every` steps and on Ctrl-C, and a run resumed from it takes
the same steps as one that was never stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..atomic import atomic_path
from ..errors import Interrupted, SfcError
from ..progress import progress_bar
from ..quant.spec import QuantSpec
from ..quant.weights import quantize_weight, stored_scales, weight_scales
from .budget import WeightOption, storage_bits
from .data_parallel import join
from .fakequant import expand_scales, fake_quantize
from .solve import fill_budget, solve_choice

if TYPE_CHECKING:
    import torch

__all__ = [
    "LearnedWeights",
    "OneStageConfig",
    "OneStageResult",
    "SearchedWeight",
    "StartFn",
    "check_device",
    "one_stage_search",
]

TaskLoss = Callable[[int, Mapping[str, "torch.Tensor"]], "torch.Tensor"]
# (weight name, its fixed format) -> the fine-tuning's starting integers and scales
StartFn = Callable[[str, QuantSpec], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class OneStageConfig:
    """The search's knobs. `steps` of joint search, then `finetune_steps` with bits fixed
    (`steps` 0: nothing is searched, each weight's one candidate is its format).
    Learning rates are Adam's, per parameter kind: `lr_weights` for the FP32 latents while
    searching (absolute); `lr_scales` for the log of every scale (relative: 1e-3 moves a
    scale by at most about 0.1% a step); the temperature decays geometrically
    from `tau_start` to `tau_end`. The size term is mu * excess + size_weight / 2 *
    max(excess, 0)^2, excess = expected average bits - budget; mu (>= 0, the price of a
    bit) moves by `dual_lr` * excess after every search step. `device`: where torch
    trains ("cpu", deterministic; or "cuda"). `augment`: perturbed copies of each training
    clip (speed, reverberation, noise; `calib.augment`) added to the training set.
    `finetune_init`: what the fine-tuning starts from once the bits are fixed: "gptq" (the
    build's GPTQ integers and scales at each chosen format: the search's latents moved
    too little at `lr_weights` to beat them) or "search" (the search's own latents and
    scales). `lr_finetune`: Adam's rate for the latents while fine-tuning, in quantization
    steps of each weight's chosen format (its mean scale): a latent on a grid point must
    move half a step to change its integer, so 0.01 allows that in about 50 steps.
    `finetune_schedule`: "linear" decays every fine-tuning rate towards 0 (step k of n at
    (n - k) / n of it: the integers settle instead of flipping on the last batches'
    noise), "constant" keeps it. `objective`: what the caller's task loss measures, "kl"
    (the teacher's next-token distribution) or "blocks" (each transformer block's output
    against the teacher's, the block fed the teacher's own input, AutoRound-style; the
    logits table against the teacher's logits)."""

    steps: int = 200
    finetune_steps: int = 100
    lr_weights: float = 1e-5
    lr_scales: float = 1e-3
    lr_logits: float = 0.05
    tau_start: float = 2.0
    tau_end: float = 0.1
    size_weight: float = 1.0
    dual_lr: float = 0.01
    seed: int = 0
    checkpoint_every: int = 25
    device: str = "cpu"
    augment: int = 1
    finetune_init: str = "gptq"
    lr_finetune: float = 0.01
    finetune_schedule: str = "linear"
    objective: str = "kl"

    def __post_init__(self) -> None:
        for name in ("steps", "finetune_steps", "checkpoint_every", "seed", "augment"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SfcError(f"one-stage {name} must be a non-negative int, not {value!r}")
        if self.checkpoint_every < 1:
            raise SfcError("one-stage search needs checkpoint_every >= 1")
        for name in ("lr_weights", "lr_scales", "lr_logits", "tau_start", "tau_end",
                     "size_weight", "dual_lr", "lr_finetune"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not math.isfinite(value) or value < 0):
                raise SfcError(f"one-stage {name} must be a finite number >= 0, not {value!r}")
        if not 0 < self.tau_end <= self.tau_start:
            raise SfcError("one-stage temperatures need 0 < tau_end <= tau_start")
        if self.finetune_init not in ("gptq", "search"):
            raise SfcError(f"one-stage finetune_init must be gptq or search, not "
                           f"{self.finetune_init!r}")
        if self.finetune_schedule not in ("linear", "constant"):
            raise SfcError(f"one-stage finetune_schedule must be linear or constant, not "
                           f"{self.finetune_schedule!r}")
        if self.objective not in ("kl", "blocks"):
            raise SfcError(f"one-stage objective must be kl or blocks, not {self.objective!r}")
        if self.device not in ("cpu", "cuda"):
            raise SfcError(f"--train-device must be cpu or cuda, not {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def tau(self, step: int) -> float:
        """The Gumbel-softmax temperature at search step `step` (0-based)."""
        frac = min(step, self.steps - 1) / max(1, self.steps - 1) if self.steps else 1.0
        return float(self.tau_start * (self.tau_end / self.tau_start) ** frac)


@dataclass(frozen=True)
class SearchedWeight:
    """One weight the search decides: its name, FP32 value (ONNX layout) and candidates."""

    name: str
    value: np.ndarray
    specs: tuple[QuantSpec, ...]

    def __post_init__(self) -> None:
        if not self.specs:
            raise SfcError(f"{self.name}: a searched weight needs at least one candidate")
        if self.value.dtype != np.float32 or self.value.ndim != 2:
            raise SfcError(f"{self.name}: searched weights are 2-D float32 [K, N]")


@dataclass(frozen=True)
class LearnedWeights:
    """What the search hands to the recipe: weight -> (chosen spec, int8 integers, float32
    scales), plus the learned FP32 latents' and the originals' digests."""

    chosen: Mapping[str, tuple[QuantSpec, np.ndarray, np.ndarray]]
    original_sha256: str
    learned_sha256: str


@dataclass
class OneStageResult:
    """The search's outcome and history (for the report and its plot)."""

    weights: LearnedWeights
    probs: dict[str, list[float]]  # weight -> final candidate probabilities
    labels: dict[str, list[str]]  # weight -> candidate labels, in probs' order
    avg_bits: float  # of the chosen assignment, over every counted parameter
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "avg_bits": self.avg_bits,
            "chosen": {n: _label(s) for n, (s, _, _) in sorted(self.weights.chosen.items())},
            "probs": self.probs, "labels": self.labels, "history": self.history,
            "seconds": self.seconds, "original_sha256": self.weights.original_sha256,
            "learned_sha256": self.weights.learned_sha256,
        }


def _label(spec: QuantSpec) -> str:
    return WeightOption(spec, 0).label


def _digest(arrays: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode() + b"\0" + f"{a.dtype.str}{a.shape}".encode() + a.tobytes())
    return h.hexdigest()


class _Mixed:
    """The trainable state of every searched weight (torch tensors, CPU or `device`)."""

    def __init__(self, weights: Sequence[SearchedWeight], device: str) -> None:
        import torch

        self.names = [w.name for w in weights]
        self.specs = {w.name: w.specs for w in weights}
        self.latent = {w.name: torch.tensor(w.value, device=device, requires_grad=True)
                       for w in weights}
        # A candidate's scales are base * exp(log_scale): Adam moves them by a fraction of
        # themselves, so an INT8 channel's ~1e-3 scale and an INT2 block's ~1e-1 learn at
        # the same relative rate (an absolute rate doubled INT8 scales within 50 steps).
        self.base = {w.name: [torch.tensor(weight_scales(w.value, s, None), device=device)
                              for s in w.specs] for w in weights}
        self.log_scales = {w.name: [torch.zeros_like(b, requires_grad=True)
                                    for b in self.base[w.name]] for w in weights}
        self.logits = {w.name: torch.zeros(len(w.specs), device=device, requires_grad=True)
                       for w in weights}
        self.bits = {w.name: torch.tensor([float(storage_bits(w.value.shape, s))
                                           for s in w.specs], device=device,
                                          dtype=torch.float64)
                     for w in weights}
        self.fixed: dict[str, int] = {}

    def tensors(self) -> dict[str, Any]:
        """Everything a checkpoint holds, by stable names."""
        out: dict[str, Any] = {}
        for n in self.names:
            out[f"latent:{n}"] = self.latent[n]
            out[f"logits:{n}"] = self.logits[n]
            for i, (b, g) in enumerate(zip(self.base[n], self.log_scales[n], strict=True)):
                out[f"base{i}:{n}"], out[f"logscale{i}:{n}"] = b, g
        return out

    def scale(self, name: str, index: int) -> torch.Tensor:
        """Candidate `index`'s scales (what the forward pass and the export both use)."""
        import torch

        return self.base[name][index] * torch.exp(self.log_scales[name][index])

    def candidate(self, name: str, index: int) -> torch.Tensor:
        return fake_quantize(self.latent[name], self.scale(name, index),
                             self.specs[name][index])

    def sample(self, tau: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Effective weights: the fixed candidate, or a Gumbel-softmax mix of all."""
        import torch
        from torch.utils.checkpoint import checkpoint

        out = {}
        for n in self.names:
            if n in self.fixed:
                out[n] = self.candidate(n, self.fixed[n])
                continue
            u = torch.rand(len(self.specs[n]), generator=generator, dtype=torch.float32)
            gumbel = -torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-7))).to(self.logits[n].device)
            mix = torch.softmax((self.logits[n] + gumbel) / tau, dim=0)
            # Recomputed in the backward pass: the candidates' intermediates would
            # otherwise hold several copies of every weight per candidate.
            out[n] = checkpoint(self._mix, n, mix, self.latent[n], *self.log_scales[n],
                                use_reentrant=False)
        return out

    def _mix(self, name: str, mix: torch.Tensor, latent: torch.Tensor,
             *log_scales: torch.Tensor) -> torch.Tensor:
        import torch

        specs, base = self.specs[name], self.base[name]
        total = mix[0] * fake_quantize(latent, base[0] * torch.exp(log_scales[0]), specs[0])
        for i in range(1, len(specs)):
            total = total + mix[i] * fake_quantize(latent, base[i] * torch.exp(log_scales[i]),
                                                   specs[i])
        return total

    def expected_bits(self) -> torch.Tensor:
        """Expected bits of the searched weights (exact once the bits are fixed)."""
        import torch

        return sum((self.bits[n][self.fixed[n]] if n in self.fixed
                    else torch.softmax(self.logits[n], 0).double() @ self.bits[n]
                    for n in self.names), torch.zeros((), dtype=torch.float64))

    def probs(self) -> dict[str, list[float]]:
        import torch

        return {n: [round(float(p), 6) for p in torch.softmax(self.logits[n].detach(), 0)]
                for n in self.names}


def check_device(device: str) -> None:
    """SfcError unless torch can train on `device` here."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SfcError("--train-device cuda: torch sees no CUDA GPU here (this torch is "
                       f"{torch.__version__}); train on cpu")


def _optimizer(mixed: _Mixed, config: OneStageConfig, searching: bool) -> torch.optim.Optimizer:
    import torch

    if searching:
        groups = [{"params": [mixed.latent[n] for n in mixed.names], "lr": config.lr_weights}]
    else:  # per weight: `lr_finetune` quantization steps of its chosen format
        groups = [{"params": [mixed.latent[n]], "lr": config.lr_finetune * float(
            mixed.scale(n, mixed.fixed[n]).detach().mean())} for n in mixed.names]
    groups.append({"params": [g for n in mixed.names for g in mixed.log_scales[n]],
                   "lr": config.lr_scales})
    if searching:
        groups.append({"params": [mixed.logits[n] for n in mixed.names],
                       "lr": config.lr_logits})
    return torch.optim.Adam(groups)


def _decay(opt: torch.optim.Optimizer, config: OneStageConfig, k: int) -> None:
    """Set fine-tuning step `k`'s rates from each group's first rate (kept in the group,
    so a resumed run's optimizer state carries it)."""
    left = 1.0 if config.finetune_schedule == "constant" else 1 - k / config.finetune_steps
    for group in opt.param_groups:
        group["lr"] = group.setdefault("initial_lr", group["lr"]) * left


def _run_key(weights: Sequence[SearchedWeight], config: OneStageConfig, bits_allowed: float,
             fixed_bits: float, params: int, extra: str) -> str:
    data = [config.to_dict(), bits_allowed, fixed_bits, params, extra,
            [[w.name, [s.to_dict() for s in w.specs]] for w in weights],
            _digest({w.name: w.value for w in weights})]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _save(path: Path, state: dict[str, Any]) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def one_stage_search(weights: Sequence[SearchedWeight], task_loss: TaskLoss, *,
                     bits_allowed: float, params: int, fixed_bits: float = 0.0,
                     config: OneStageConfig = OneStageConfig(),
                     checkpoints: Path | None = None, key_extra: str = "",
                     progress: bool = True, start: StartFn | None = None,
                     stop_after: int | None = None) -> OneStageResult:
    """Learn each weight's format within `bits_allowed` and its quantized values.

    `task_loss(step, weights)`: the task loss of step `step` with the effective weights
    (ONNX layout, float32 tensors); it must pick its batch from `step` alone, so a resumed
    run sees the same data. `bits_allowed`: the budget in bits for all `params` counted
    parameters; `fixed_bits`: the bits of the counted parameters not searched (float or
    fixed-format weights).
    `checkpoints`: the folder of resumable states, one file per run key (weights, specs,
    budget, config and `key_extra`, which names what the caller's data depends on).
    `start`: where the fine-tuning starts once the bits are fixed: each latent becomes
    `start`'s integers times its scales, and the chosen candidate's scales its scales
    (None: the search's own latents and scales go on).
    `stop_after`: end after that many total steps as if interrupted (tests).
    """
    import torch

    device = config.device
    check_device(device)
    world = join(device)
    if not weights:
        raise SfcError("one-stage search: no weight to search")
    if len({w.name for w in weights}) != len(weights):
        raise SfcError("one-stage search: a weight is listed twice")
    if config.steps == 0 and any(len(w.specs) > 1 for w in weights):
        raise SfcError("one-stage search with 0 search steps needs one candidate format per "
                       "weight (nothing else fixes the bits)")
    if params < 1 or not math.isfinite(bits_allowed) or bits_allowed <= fixed_bits:
        raise SfcError("one-stage search: the budget leaves no bits for the searched weights")
    target_avg = bits_allowed / params
    searched_bits = bits_allowed - fixed_bits
    options = {w.name: [WeightOption(s, storage_bits(w.value.shape, s)) for s in w.specs]
               for w in weights}
    if sum(min(o.bits for o in v) for v in options.values()) > searched_bits:
        raise SfcError(f"one-stage search: the budget ({target_avg:.3g} average bits) is "
                       "below the smallest choice of the searched weights")
    started = time.perf_counter()
    key = _run_key(weights, config, bits_allowed, fixed_bits, params, key_extra)
    mixed = _Mixed(weights, device)
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, Any]] = []
    # Wall seconds per phase, over every run that led here (resumes add up).
    spent = {"search": 0.0, "fixing bits": 0.0, "fine-tuning": 0.0}
    step = 0
    mu = 0.0  # the size term's multiplier
    opt = _optimizer(mixed, config, searching=True)
    total = config.steps + config.finetune_steps
    state_file = None if checkpoints is None else checkpoints / f"onestage-{key[:32]}.pt"
    if state_file is not None and state_file.is_file():
        state = torch.load(state_file, weights_only=False)
        if state.get("key") == key:
            with torch.no_grad():
                for name, t in mixed.tensors().items():
                    t.copy_(state["tensors"][name])
            step, history = state["step"], state["history"]
            spent = dict(state["seconds"])
            mixed.fixed = dict(state["fixed"])
            mu = state["mu"]
            generator.set_state(state["generator"])
            if step >= config.steps:
                opt = _optimizer(mixed, config, searching=False)
            opt.load_state_dict(state["optimizer"])

    def save() -> None:
        if state_file is not None and world.rank == 0:
            _save(state_file, {"key": key, "step": step, "history": history,
                               "seconds": spent,
                               "fixed": mixed.fixed, "generator": generator.get_state(),
                               "mu": mu,
                               "optimizer": opt.state_dict(),
                               "tensors": {n: t.detach().cpu()
                                           for n, t in mixed.tensors().items()}})

    def fix_bits() -> None:
        # The most probable assignment within the budget: -log p as the cost of each
        # option, solved exactly (the argmax itself whenever it fits).
        probs = mixed.probs()
        costed = {n: [WeightOption(o.spec, o.bits, -math.log(max(p, 1e-12)))
                      for o, p in zip(options[n], probs[n], strict=True)]
                  for n in mixed.names}
        # The program lands under the budget when the argmax is over it (downgrades cost
        # less probability than the bits they free): the rest is given back by `fill_budget`.
        mixed.fixed = fill_budget(costed, solve_choice(costed, searched_bits), searched_bits)
        if start is None:
            return
        with torch.no_grad():
            for n, index in mixed.fixed.items():
                spec = mixed.specs[n][index]
                ints, scales = start(n, spec)
                s = torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float32))
                mixed.latent[n].copy_(torch.from_numpy(ints.astype(np.float32))
                                      * expand_scales(s, spec, tuple(ints.shape)))
                mixed.base[n][index].copy_(s)
                mixed.log_scales[n][index].zero_()

    def settle() -> None:
        # Fix the bits once, before any checkpoint of the fine-tuning phase is written.
        nonlocal opt
        began = time.perf_counter()
        fix_bits()
        opt = _optimizer(mixed, config, searching=False)
        spent["fixing bits"] += time.perf_counter() - began

    if config.steps == 0 and not mixed.fixed:  # nothing to search: fine-tuning only
        settle()
    try:
        with progress_bar(enabled=progress, transient=True) as bar:
            task = bar.add_task("one-stage search", total=total, completed=step)
            while step < total:
                if stop_after is not None and step >= stop_after:
                    raise KeyboardInterrupt
                searching = step < config.steps
                began = time.perf_counter()
                tau = config.tau(step)
                opt.zero_grad(set_to_none=True)
                loss = task_loss(step, mixed.sample(tau, generator))
                avg = (mixed.expected_bits() + fixed_bits) / params
                excess = avg - target_avg
                size = mu * excess + config.size_weight / 2 * torch.relu(excess) ** 2
                # Every process adds the size term; its gradients are summed over them.
                total_loss = loss + size.float() / world.size if searching else loss
                total_loss.backward()
                world.sum_gradients(mixed.tensors().values())
                if not searching:
                    _decay(opt, config, step - config.steps)
                opt.step()
                if searching:
                    mu = max(0.0, mu + config.dual_lr * float(excess.detach()))
                history.append({"step": step, "loss": world.sum(float(loss.detach())),
                                "tau": tau, "mu": mu,
                                "expected_bits": float(avg.detach()),
                                "probs": None if mixed.fixed else mixed.probs()})
                step += 1
                spent["search" if searching else "fine-tuning"] += time.perf_counter() - began
                last = history[-1]
                bar.update(task, completed=step, description=(
                    f"one-stage {'search' if searching else 'fine-tune'} loss "
                    f"{last['loss']:.4g} bits {last['expected_bits']:.2f} tau {tau:.2f}"))
                if step == config.steps:  # right after the last search step
                    settle()
                if step % config.checkpoint_every == 0 or step == config.steps:
                    save()
    except KeyboardInterrupt:
        save()
        if state_file is None:
            raise
        raise Interrupted(f"interrupted: the one-stage search stopped at step {step} of "
                          f"{total}; its state is in {state_file} (run the same command "
                          "again to resume)") from None
    chosen = {}
    learned = {}
    for w in weights:
        index = mixed.fixed[w.name]
        spec = w.specs[index]
        latent = mixed.latent[w.name].detach().cpu().numpy()
        scales = stored_scales(mixed.scale(w.name, index).detach().cpu().numpy(), spec)
        chosen[w.name] = (spec, quantize_weight(latent, spec, scales), scales)
        learned[w.name] = latent
    used = sum(options[n][i].bits for n, i in mixed.fixed.items()) + fixed_bits
    return OneStageResult(
        LearnedWeights(chosen, _digest({w.name: w.value for w in weights}), _digest(learned)),
        probs=mixed.probs(), labels={w.name: [_label(s) for s in w.specs] for w in weights},
        avg_bits=used / params, history=history,
        seconds={**spent, "this_run": time.perf_counter() - started})

