"""The one-stage search on a zoo Whisper checkpoint, through transformers' PyTorch model.

The student is the checkpoint's `WhisperForConditionalGeneration` with every searched
MatMul weight replaced (`torch.func.functional_call`) by its fake-quantized mix; the
teacher is the same model with its own FP32 weights. Searched weights are found in the
PyTorch model by value: an exported MatMul weight is its Linear's weight transposed (the
tied logits/embedding table included). Its embedding reads what the deployed Gather
reads: the same mix on targets where the Gather shares the MatMul's copy, and the fixed
INT8 copy of the float table where it gets its own (`gather_copy_int8`, ort-cpu).
Convolutions stay FP32 in the student; the plan stores them at their base format,
counted in the budget as fixed bits.

Training data: the first 30 s windows of the calibration clips and of any `--train-data`
clips (e.g. `sfc synth`'s), and `augment` perturbed copies of each (`calib.augment`), with
the teacher's own greedy transcripts (`whisper_reference`),
teacher-forced; the loss is the mean KL divergence
from the teacher's to the student's next-token distributions over transcript positions,
or (objective "blocks") each transformer block's relative squared error against the
teacher's block output, every block fed the teacher's own input, plus the KL of the
logits computed from the teacher's final decoder state: a dense signal per block, as
AutoRound's and BRECQ's block reconstruction use, where the KL of the last layer alone is
a sparse one.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from onnx import numpy_helper

from ..errors import SfcError
from ..quant.spec import QuantSpec
from ..quant.weights import dequantize_weight, round_to_nearest
from ..runtime.session import shrink_shared_arena
from .budget import WeightOption, storage_bits
from .data_parallel import ALONE, World, join, shard
from .onestage import OneStageResult, SearchedWeight, TaskLoss, one_stage_search
from .search import GraphWeights, LayerChoice, SearchConfig, SearchResult, float_params

if TYPE_CHECKING:
    import torch

__all__ = ["audio_digest", "choose_one_stage", "hf_names", "whisper_block_loss",
           "whisper_task_loss"]

BATCH = 4  # training clips per step


def _key(value: np.ndarray) -> str:
    a = np.ascontiguousarray(value, dtype=np.float32)
    return hashlib.sha256(f"{a.shape}".encode() + a.tobytes()).hexdigest()


def hf_names(model: torch.nn.Module, weights: Mapping[str, np.ndarray]) -> dict[str, str]:
    """ONNX weight name -> the PyTorch parameter it was exported from (that parameter
    transposed equals the ONNX [K, N] weight bit for bit); SfcError names the first weight
    with no such parameter."""
    by_value: dict[str, str] = {}
    for name, param in model.named_parameters():
        if param.ndim == 2:
            by_value.setdefault(_key(param.detach().cpu().numpy().T), name)
    out = {}
    for onnx_name, value in weights.items():
        found = by_value.get(_key(value))
        if found is None:
            raise SfcError(f"one-stage search: weight '{onnx_name}' {value.shape} matches no "
                           "Linear of the PyTorch checkpoint (was the ONNX file exported "
                           "from another checkpoint?)")
        out[onnx_name] = found
    return out


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
        mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of each masked token."""
    import torch

    t = torch.log_softmax(teacher_logits[mask], dim=-1)
    s = torch.log_softmax(student_logits[mask], dim=-1)
    return (t.exp() * (t - s)).sum(-1)


def _shard_tensors(batch: Any, world: World, device: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This process's rows of a `whisper_reference` batch as tensors on `device`:
    features, the decoder's input tokens (the transcript less its last token), and the
    mask of the positions scored."""
    import torch

    rows = shard(len(batch.tokens), world)
    return tuple(torch.from_numpy(np.ascontiguousarray(a)).to(device)  # type: ignore[return-value]
                 for a in (batch.features[rows], batch.tokens[rows, :-1], batch.mask[rows]))


def _embedding_uses(model: torch.nn.Module, name: str) -> tuple[list[str], list[str]]:
    """(names under which parameter `name` is an nn.Embedding's weight, its other names):
    a tied table is one tensor under several names."""
    import torch

    target = dict(model.named_parameters())[name]
    embedding: list[str] = []
    other: list[str] = []
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if param is target:
                full = f"{module_name}.{param_name}" if module_name else param_name
                (embedding if isinstance(module, torch.nn.Embedding) else other).append(full)
    return embedding, other


def whisper_task_loss(model: torch.nn.Module, names: Mapping[str, str],
                      batches: Sequence[Any], device: str = "cpu",
                      gathered: Mapping[str, np.ndarray] | None = None,
                      world: World = ALONE, objective: str = "kl") -> TaskLoss:
    """The task loss of step `step`: KL to the teacher on batch `step % len(batches)`
    (`batches`: `whisper_reference` batches: features, tokens, mask), the mean over its
    tokens. `gathered`: ONNX weight name -> the fixed copy (ONNX [K, N] layout) its
    embedding uses read instead of the student's weight (the Gathers' own copy). With
    several processes (`world`), this process's rows' share: their KL summed over the
    whole batch's token count. `objective` "blocks": `whisper_block_loss` instead."""
    import torch

    if not batches:
        raise SfcError("one-stage search needs at least one training clip")
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if objective == "blocks":
        return whisper_block_loss(model, names, batches, device, world)
    # Untied: each use of a gathered table named explicitly (functional_call would
    # otherwise give every tied name the student's weight).
    fixed: dict[str, torch.Tensor] = {}
    linear_uses: dict[str, list[str]] = {}
    for onnx_name, copy in (gathered or {}).items():
        embedding, other = _embedding_uses(model, names[onnx_name])
        fixed.update({e: torch.from_numpy(np.ascontiguousarray(copy.T)).to(device)
                      for e in embedding})
        linear_uses[onnx_name] = other

    def loss(step: int, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        batch = batches[step % len(batches)]
        features, tokens, mask = _shard_tensors(batch, world, device)
        kwargs = {"input_features": features, "decoder_input_ids": tokens}
        with torch.no_grad():
            teacher = model(**kwargs).logits
        params = dict(fixed)
        for n, w in weights.items():
            params.update({use: w.T for use in linear_uses.get(n, [names[n]])})
        student = torch.func.functional_call(model, params, (), kwargs,
                                             tie_weights=not fixed).logits
        kl = _kl(teacher, student, mask)
        if world.parallel:
            return kl.sum() / max(1, int(batch.mask.sum()))
        return kl.mean()

    return loss


_LAYER = re.compile(r"(?:.*\.)?(?:encoder|decoder)\.layers\.\d+")


def whisper_block_loss(model: torch.nn.Module, names: Mapping[str, str],
                       batches: Sequence[Any], device: str = "cpu",
                       world: World = ALONE) -> TaskLoss:
    """Block reconstruction against the teacher on batch `step % len(batches)`: for each
    encoder and decoder layer holding a searched weight, the layer is run with the
    student's weights on the teacher's own input to it, and its output's squared error
    relative to the teacher's output's energy is taken per clip (decoder layers over the
    transcript positions); the logits table is scored by the KL of the logits it gives from
    the teacher's final decoder state (its embedding use reads the teacher's input, so a
    Gather copy plays no part). The loss is the sum over blocks of each block's mean over
    clips (plus the mean KL per token), so each weight is trained by its own block only.
    SfcError names a searched weight that is neither in a layer nor the logits table."""
    import torch

    model = model.to(device).eval()
    layers = {n: m for n, m in model.named_modules() if _LAYER.fullmatch(n)}
    seq2seq: Any = model.model  # encoder + decoder, without the logits projection
    head = getattr(model, "proj_out", None)
    params = dict(model.named_parameters())  # a tied table under one of its names
    by_layer: dict[str, dict[str, str]] = {}  # layer -> onnx name -> parameter in it
    head_weights: list[str] = []
    for onnx_name, param in names.items():
        layer = next((n for n in layers if param.startswith(n + ".")), None)
        if layer is not None:
            by_layer.setdefault(layer, {})[onnx_name] = param[len(layer) + 1:]
        elif head is not None and params.get(param) is head.weight:
            head_weights.append(onnx_name)
        else:
            raise SfcError(f"block reconstruction: weight '{onnx_name}' ({param}) is in no "
                           "encoder or decoder layer and is not the logits table")

    def loss(step: int, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        batch = batches[step % len(batches)]
        features, tokens, mask = _shard_tensors(batch, world, device)
        seen: dict[str, tuple[Any, dict[str, Any], torch.Tensor]] = {}

        def keep(name: str) -> Callable[..., None]:
            def hook(_: Any, args: Any, kwargs: dict[str, Any], out: Any) -> None:
                kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
                seen[name] = (args, kwargs, out[0] if isinstance(out, tuple) else out)
            return hook

        handles = [layers[n].register_forward_hook(keep(n), with_kwargs=True)
                   for n in by_layer]
        try:
            with torch.no_grad():
                final = seq2seq(input_features=features, decoder_input_ids=tokens,
                                use_cache=False).last_hidden_state
        finally:
            for h in handles:
                h.remove()
        total = torch.zeros((), device=device)
        clips = len(batch.tokens)  # the whole batch's, so shards' sums add up
        for layer, params in by_layer.items():
            args, kwargs, want = seen[layer]
            got = torch.func.functional_call(layers[layer], {
                sub: weights[n].T for n, sub in params.items()}, args, kwargs)
            got = got[0] if isinstance(got, tuple) else got
            keep_rows = mask if ".decoder." in f".{layer}" else torch.ones(
                got.shape[:2], dtype=torch.bool, device=device)
            weight = keep_rows.unsqueeze(-1).to(got.dtype)
            err = (((got - want) ** 2) * weight).sum((1, 2))
            energy = ((want ** 2) * weight).sum((1, 2)).clamp_min(1e-12)
            total = total + (err / energy).sum() / clips
        for n in head_weights:
            teacher = torch.nn.functional.linear(final, head.weight)  # type: ignore[union-attr]
            student = torch.nn.functional.linear(final, weights[n].T)
            total = total + _kl(teacher, student, mask).sum() / max(1, int(batch.mask.sum()))
        return total

    return loss


def _gather_copies(graphs: Sequence[GraphWeights], searched: Sequence[SearchedWeight]
                   ) -> dict[str, np.ndarray]:
    """Searched weight ("graph:tensor") -> the dequantized copy its Gathers read on this
    target, for weights whose Gathers get their own copy under some candidate. One copy
    for all candidates: the same INT8 copy of the float table under every block format.
    Under the INT8 per-channel candidate the Gathers would read that instead (per vocab
    row on a Whisper table); the student does not switch its embedding per candidate."""
    by_graph = {g.name: g for g in graphs}
    out = {}
    for sw in searched:
        gname, tensor = sw.name.split(":", 1)
        spec = next((c for c in by_graph[gname].gather_specs(tensor) if c is not None), None)
        if spec is not None:
            ints, scales = round_to_nearest(sw.value, spec, "absmax")
            out[sw.name] = dequantize_weight(ints, spec, scales)
    return out


def audio_digest(utterances: Sequence[Any]) -> str:
    """sha256 over the ids and audio bytes of `utterances` (training data's identity)."""
    h = hashlib.sha256()
    for u in utterances:
        h.update(u.id.encode() + b"\0" + hashlib.sha256(Path(u.audio).read_bytes()).digest())
    return h.hexdigest()


def choose_one_stage(graphs: Sequence[GraphWeights], config: SearchConfig, zoo: str,
                     runtime: Any, utterances: Sequence[Any], checkpoints: Path | None,
                     extra: Sequence[Any] = ()) -> tuple[SearchResult, OneStageResult]:
    """Learn every searched weight's format and values on zoo checkpoint `zoo`; the
    result in the two-stage search's form (each option's "sensitivity" is -log of its
    learned probability, the integer program's cost) and the learned weights, keyed
    "graph:tensor". `extra`: more training clips (`--train-data`), beside the
    calibration `utterances` (which are also GPTQ's)."""
    from ..calib.augment import augment
    from ..calib.objectives import whisper_reference
    from ..models.whisper_hf import load_whisper
    from ..models.zoo import locate_checkpoint
    from ..runtime.audio import load_audio

    started = time.perf_counter()
    searched: list[SearchedWeight] = []
    meta: dict[str, tuple[str, Any]] = {}
    params = other = fixed_bits = 0
    for g in graphs:
        inits = {t.name: t for t in g.model.graph.initializer}
        kept, rest = float_params(g.model, g.plan)
        params, other, fixed_bits = params + kept, other + rest, fixed_bits + 32 * kept
        for q in g.plan.weights:
            w = numpy_helper.to_array(inits[q.tensor])
            params += w.size
            if w.ndim == 2 and w.dtype == np.float32:
                key = f"{g.name}:{q.tensor}"
                searched.append(SearchedWeight(key, w, tuple(g.specs[q.tensor])))
                meta[key] = (g.name, q)
            else:  # convolutions keep the base plan's format
                fixed_bits += storage_bits(w.shape, q.spec)
    bits_allowed = config.budget.bits_allowed(params, other)
    model = load_whisper(locate_checkpoint(zoo)).model
    names = hf_names(model, {w.name: w.value for w in searched})
    labelled = time.perf_counter()
    clips = [*utterances, *extra]
    batches = list(whisper_reference(runtime, clips, "teacher-forced", batch=BATCH).batches)
    for copy in range(config.one_stage.augment):
        def perturbed(index: int, utterance: Any, copy: int = copy) -> np.ndarray:
            return augment(load_audio(utterance.audio), (config.one_stage.seed, copy, index))

        batches += whisper_reference(runtime, clips, "teacher-forced", batch=BATCH,
                                     audio=perturbed).batches
    labelled = time.perf_counter() - labelled
    shrink_shared_arena()  # training runs without what the teacher's runs left there
    copies = _gather_copies(graphs, searched)
    # The student differs with the Gathers' copies, so which tables read one is in the key
    # (a copy itself follows from the checkpoint's weights, already pinned).
    data_key = json.dumps([zoo, [u.id for u in utterances], audio_digest(extra)]
                          + ([sorted(copies)] if copies else []))
    world = join(config.one_stage.device)
    task = whisper_task_loss(model, names, batches, config.one_stage.device, copies, world,
                             config.one_stage.objective)
    by_graph = {g.name: g for g in graphs}

    def gptq(key: str, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
        gname, tensor = key.split(":", 1)
        ints, scales, _ = by_graph[gname].quantize(tensor, spec)
        return ints, scales

    result = one_stage_search(searched, task,
                              bits_allowed=bits_allowed, params=params, fixed_bits=fixed_bits,
                              config=config.one_stage, checkpoints=checkpoints,
                              key_extra=data_key,
                              start=gptq if config.one_stage.finetune_init == "gptq" else None)
    layers = []
    for sw in searched:
        gname, q = meta[sw.name]
        chosen = result.weights.chosen[sw.name][0]
        rows = tuple({"label": WeightOption(s, 0).label, "bits": storage_bits(sw.value.shape, s),
                      "sensitivity": -math.log(max(p, 1e-12)), "proxy": None, "probability": p}
                     for s, p in zip(sw.specs, result.probs[sw.name], strict=True))
        layers.append(LayerChoice(gname, q.tensor, q.consumers, sw.value.size, rows,
                                  sw.specs.index(chosen)))
    phases = {"teacher transcripts": labelled,
              **{k: v for k, v in result.seconds.items() if k != "this_run"}}
    search = SearchResult(config, "one-stage", 0.0, bits_allowed, params, other,
                          tuple(layers), None, time.perf_counter() - started, fixed_bits,
                          phases=phases)
    return search, result
