"""One-stage mixed precision: the fake quantizer is the QDQ writer's arithmetic bit for bit,
the search gives insensitive weights fewer bits within the budget, and an interrupted run
resumes to the same result."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sfc.errors import Interrupted, SfcError
from sfc.precision.budget import storage_bits
from sfc.precision.fakequant import fake_quantize
from sfc.precision.onestage import OneStageConfig, SearchedWeight, one_stage_search
from sfc.quant.spec import QuantSpec
from sfc.quant.weights import dequantize_weight, pairs_over, quantize_weight, weight_scales

C8 = QuantSpec(8, "channel", axis=1)
B4 = QuantSpec(4, "block", axis=0, block_size=32)
B2 = QuantSpec(2, "block", axis=0, block_size=32)
B4_128 = QuantSpec(4, "block", axis=0, block_size=128)
C8_PAIRS = QuantSpec(8, "channel", axis=1, pair_limit=128)  # ort-cpu:avx2's INT8


@pytest.mark.parametrize("spec", [C8, B4, B2, B4_128, C8_PAIRS], ids=lambda s: s.describe())
def test_fake_quantize_is_the_writers_dequantized_weight_bit_for_bit(spec: QuantSpec) -> None:
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.05, (80, 24)).astype(np.float32)  # K=80: a partial last block
    scales = weight_scales(w, spec, "mse")
    # Exact halves of a step (round half to even) and values far outside the range.
    s_full = dequantize_weight(np.ones_like(w, dtype=np.int8), spec, scales)
    w[0] = 2.5 * s_full[0]
    w[1] = -0.5 * s_full[1]
    w[2] = 1000 * s_full[2]
    expected = dequantize_weight(quantize_weight(w, spec, scales), spec, scales)
    got = fake_quantize(torch.from_numpy(w), torch.from_numpy(scales), spec).numpy()
    assert got.dtype == np.float32
    assert np.array_equal(got.view(np.int32), expected.view(np.int32))
    if spec.pair_limit is not None:  # scales half as large: many pairs over the limit
        half = (scales / 2).astype(np.float32)
        q = quantize_weight(w, spec, half)
        assert pairs_over(np.round(w / half).clip(-128, 127).astype(np.int8), 1,
                          spec.pair_limit) > 100 and pairs_over(q, 1, spec.pair_limit) == 0
        got = fake_quantize(torch.from_numpy(w), torch.from_numpy(half), spec).numpy()
        assert np.array_equal(got, dequantize_weight(q, spec, half))


def test_fake_quantize_passes_gradients_straight_through_inside_the_range() -> None:
    w = torch.tensor([[0.01], [0.3], [5.0]], requires_grad=True)  # the last one clips
    s = torch.tensor([0.1], requires_grad=True)
    fake_quantize(w, s, QuantSpec(4, "channel", axis=1)).sum().backward()
    assert w.grad is not None and s.grad is not None
    assert w.grad.flatten().tolist() == [1.0, 1.0, 0.0]
    assert float(s.grad) != 0.0


def _task(a: np.ndarray, b: np.ndarray):
    """Teacher y = x A + 1e-3 x B: B barely matters, by construction."""
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)

    def loss(step: int, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        x = torch.from_numpy(np.random.default_rng(step).normal(size=(16, a.shape[0]))
                             .astype(np.float32))
        y = x @ ta + 1e-3 * (x @ tb)
        got = x @ weights["a"] + 1e-3 * (x @ weights["b"])
        return ((got - y) ** 2).mean() / (y ** 2).mean()
    return loss


def _problem() -> tuple[list[SearchedWeight], float, int]:
    rng = np.random.default_rng(0)
    a, b = (rng.normal(0, 0.05, (64, 32)).astype(np.float32) for _ in range(2))
    weights = [SearchedWeight("a", a, (C8, B4, B2)), SearchedWeight("b", b, (C8, B4, B2))]
    # Exactly one 8-bit and one 2-bit weight (or both 4-bit) fit.
    allowed = storage_bits(a.shape, C8) + storage_bits(b.shape, B2)
    return weights, float(allowed), a.size + b.size


def test_search_gives_the_insensitive_weight_fewer_bits_within_the_budget() -> None:
    weights, allowed, params = _problem()
    config = OneStageConfig(steps=150, finetune_steps=20)
    result = one_stage_search(weights, _task(weights[0].value, weights[1].value),
                              bits_allowed=allowed, params=params, config=config,
                              progress=False)
    chosen = {n: s for n, (s, _, _) in result.weights.chosen.items()}
    assert chosen == {"a": C8, "b": B2}
    assert result.avg_bits * params <= allowed
    # The export is the learned weight at the learned scale, in the spec's range.
    for spec, q, scales in result.weights.chosen.values():
        assert q.dtype == np.int8 and q.min() >= spec.qmin and q.max() <= spec.qmax
        assert scales.dtype == np.float32 and (scales > 0).all()
    assert result.weights.learned_sha256 != result.weights.original_sha256
    assert set(result.seconds) == {"search", "fixing bits", "fine-tuning", "this_run"}
    assert result.seconds["search"] > 0 and result.seconds["fine-tuning"] > 0


def test_interrupted_search_resumes_to_the_same_result(tmp_path: Path) -> None:
    weights, allowed, params = _problem()
    config = OneStageConfig(steps=20, finetune_steps=10, checkpoint_every=4, lr_weights=1e-4)
    task = _task(weights[0].value, weights[1].value)
    whole = one_stage_search(weights, task, bits_allowed=allowed, params=params,
                             config=config, progress=False)
    for stop in (10, 23):  # once while searching, once while fine-tuning
        with pytest.raises(Interrupted, match=f"stopped at step {stop} of 30"):
            one_stage_search(weights, task, bits_allowed=allowed, params=params,
                             config=config, checkpoints=tmp_path, progress=False, stop_after=stop)
        assert len(list(tmp_path.glob("onestage-*.pt"))) == 1
    resumed = one_stage_search(weights, task, bits_allowed=allowed, params=params,
                               config=config, checkpoints=tmp_path, progress=False)
    assert resumed.history == whole.history
    # Resumed runs add up their phases' wall time rather than restarting the count.
    assert resumed.seconds["search"] > resumed.seconds["this_run"] / 2
    assert resumed.probs == whole.probs
    for name, (spec, q, s) in whole.weights.chosen.items():
        spec2, q2, s2 = resumed.weights.chosen[name]
        assert spec2 == spec and np.array_equal(q2, q) and np.array_equal(s2, s)


def test_fine_tuning_starts_from_the_callers_integers_and_scales() -> None:
    """With `start` (the build's GPTQ), the fixed weights restart from its integers and
    scales: with no fine-tuning step they are exported unchanged, bit for bit."""
    weights, allowed, params = _problem()
    values = {w.name: w.value for w in weights}
    calls = []

    def start(name: str, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
        calls.append((name, spec))
        # 1.5x the absmax scales: far from the search's own (MSE-initialised) scales.
        scales = weight_scales(values[name], spec, "absmax") * np.float32(1.5)
        return quantize_weight(values[name], spec, scales), scales

    task = _task(values["a"], values["b"])
    config = OneStageConfig(steps=30, finetune_steps=0)
    result = one_stage_search(weights, task, bits_allowed=allowed, params=params,
                              config=config, progress=False, start=start)
    chosen = {n: s for n, (s, _, _) in result.weights.chosen.items()}
    assert sorted(calls, key=lambda c: c[0]) == sorted(chosen.items())
    for name, (spec, q, scales) in result.weights.chosen.items():
        q0, s0 = start(name, spec)
        assert np.array_equal(scales, s0) and np.array_equal(q, q0)
    own = one_stage_search(weights, task, bits_allowed=allowed, params=params,
                           config=config, progress=False)
    assert any(not np.array_equal(own.weights.chosen[n][2], result.weights.chosen[n][2])
               for n in chosen)
    # Fine-tuning from that start moves the integers on.
    tuned = one_stage_search(weights, task, bits_allowed=allowed, params=params,
                             config=OneStageConfig(steps=30, finetune_steps=20,
                                                   lr_finetune=0.1),
                             progress=False, start=start)
    assert any(not np.array_equal(tuned.weights.chosen[n][1], result.weights.chosen[n][1])
               for n in chosen)


def test_zero_search_steps_fine_tune_the_one_candidate_of_each_weight() -> None:
    """`steps` 0 (a two-stage choice, or QAT): each weight's one candidate is fixed from
    the start; no fine-tuning exports the start bit for bit, fine-tuning moves it."""
    weights, _, params = _problem()
    fixed = [SearchedWeight("a", weights[0].value, (C8,)),
             SearchedWeight("b", weights[1].value, (B2,))]
    allowed = float(sum(storage_bits(w.value.shape, w.specs[0]) for w in fixed))
    values = {w.name: w.value for w in fixed}

    def start(name: str, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
        scales = weight_scales(values[name], spec, "absmax")
        return quantize_weight(values[name], spec, scales), scales

    task = _task(values["a"], values["b"])
    runs = {n: one_stage_search(fixed, task, bits_allowed=allowed, params=params,
                                config=OneStageConfig(steps=0, finetune_steps=n,
                                                      lr_finetune=0.1),
                                progress=False, start=start) for n in (0, 20)}
    for name, (spec, q, scales) in runs[0].weights.chosen.items():
        q0, s0 = start(name, spec)
        assert np.array_equal(q, q0) and np.array_equal(scales, s0)
    assert [h["step"] for h in runs[20].history] == list(range(20))
    assert all(h["probs"] is None for h in runs[20].history)  # nothing was searched
    assert any(not np.array_equal(runs[20].weights.chosen[n][1], runs[0].weights.chosen[n][1])
               for n in values)
    assert runs[20].seconds["search"] == 0.0
    with pytest.raises(SfcError, match="0 search steps needs one candidate"):
        one_stage_search(weights, task, bits_allowed=allowed * 2, params=params,
                         config=OneStageConfig(steps=0), progress=False)


def test_scales_move_relative_to_their_size_at_every_bit_width() -> None:
    """An INT8 channel's scale (~1e-3) moves no faster, relatively, than an INT2 block's:
    Adam's step on log-scales bounds the drift by about lr_scales per step."""
    weights, allowed, params = _problem()
    config = OneStageConfig(steps=40, finetune_steps=10, lr_scales=1e-3)
    result = one_stage_search(weights, _task(weights[0].value, weights[1].value),
                              bits_allowed=allowed, params=params, config=config,
                              progress=False)
    bound = np.exp(3 * 1e-3 * 50) - 1  # Adam's update is at most ~3 lr per step
    values = {w.name: w.value for w in weights}
    for name, (spec, _, scales) in result.weights.chosen.items():
        drift = np.abs(scales / weight_scales(values[name], spec, None) - 1)
        assert drift.max() <= bound, (spec.describe(), drift.max())
        assert drift.max() > 0  # they do learn


def test_linear_schedule_decays_each_groups_own_rate_and_constant_keeps_it() -> None:
    import torch

    from sfc.precision.onestage import _decay

    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    for schedule, expect in (("linear", [1.0, 0.75, 0.5, 0.25]), ("constant", [1.0] * 4)):
        opt = torch.optim.Adam([{"params": [a], "lr": 0.2}, {"params": [b], "lr": 0.02}])
        config = OneStageConfig(steps=1, finetune_steps=4, finetune_schedule=schedule)
        for k, frac in enumerate(expect):
            _decay(opt, config, k)
            assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.2 * frac, 0.02 * frac])


@pytest.mark.parametrize("field,value", [("finetune_init", "rtn"), ("lr_finetune", -1.0),
                                         ("steps", -1), ("augment", -1),
                                         ("finetune_schedule", "cosine")])
def test_config_refuses_bad_values(field: str, value: object) -> None:
    with pytest.raises(SfcError, match=field):
        OneStageConfig(**{field: value})  # type: ignore[arg-type]


def test_search_refuses_a_budget_below_the_smallest_choice() -> None:
    weights, _, params = _problem()
    floor = sum(storage_bits(w.value.shape, B2) for w in weights)
    with pytest.raises(SfcError, match="below the smallest choice"):
        one_stage_search(weights, _task(weights[0].value, weights[1].value),
                         bits_allowed=floor - 1.0, params=params, progress=False)


def test_searched_weights_are_found_in_the_pytorch_checkpoint(tiny_export: Path,
                                                              tiny_hf) -> None:
    import onnx
    from onnx import numpy_helper

    from sfc.precision.onestage_whisper import hf_names

    weights = {}
    for graph in ("encoder", "decoder"):
        model = onnx.load(str(tiny_export / f"{graph}.onnx"))
        inits = {t.name: t for t in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "MatMul" and node.input[1] in inits:
                weights[f"{graph}:{node.input[1]}"] = numpy_helper.to_array(inits[node.input[1]])
    names = hf_names(tiny_hf.model, weights)
    # encoder 4 x 6 + cross K/V 4 x 2; decoder 4 x 8 + the table
    assert len(names) == len(weights) == 65
    assert len(set(names.values())) == len(names)
    assert names["decoder:table"] in ("model.decoder.embed_tokens.weight", "proj_out.weight")
    first = next(k for k in weights if k.startswith("encoder:"))  # graph order: layer 0's q
    assert names[first].endswith("encoder.layers.0.self_attn.q_proj.weight")
    with pytest.raises(SfcError, match="matches no Linear"):
        hf_names(tiny_hf.model, {"x": weights["decoder:table"] + 1})


def test_whisper_task_loss_is_zero_at_the_teachers_weights_and_has_gradients(tiny_hf) -> None:
    from types import SimpleNamespace

    from sfc.precision.onestage_whisper import whisper_task_loss

    model = tiny_hf.model
    name = "model.decoder.layers.0.fc1.weight"
    w = dict(model.named_parameters())[name].detach().T.clone()
    rng = np.random.default_rng(0)
    batch = SimpleNamespace(features=rng.normal(size=(1, 80, 3000)).astype(np.float32),
                            tokens=np.array([[50257, 50362, 400, 318, 257, 50256]]),
                            mask=np.array([[False, True, True, True, True]]))
    loss = whisper_task_loss(model, {"fc1": name}, [batch])
    assert float(loss(0, {"fc1": w})) == pytest.approx(0.0, abs=1e-6)
    bent = (w + 0.05 * torch.from_numpy(rng.normal(size=tuple(w.shape)).astype(np.float32))
            ).requires_grad_(True)
    value = loss(0, {"fc1": bent})
    value.backward()
    assert float(value.detach()) > 1e-4
    assert bent.grad is not None and float(bent.grad.abs().sum()) > 0


def test_whisper_task_loss_feeds_the_gather_copy_to_the_embedding_only(tiny_hf) -> None:
    from types import SimpleNamespace

    from sfc.precision.onestage_whisper import whisper_task_loss

    model = tiny_hf.model
    name = "model.decoder.embed_tokens.weight"
    table = dict(model.named_parameters())[name].detach().T.clone()  # ONNX [K, N]
    rng = np.random.default_rng(1)
    batch = SimpleNamespace(features=rng.normal(size=(1, 80, 3000)).astype(np.float32),
                            tokens=np.array([[50257, 50362, 400, 318, 257, 50256]]),
                            mask=np.array([[False, True, True, True, True]]))
    noise = 0.05 * rng.normal(size=tuple(table.shape)).astype(np.float32)

    def kl(copy: np.ndarray, weight: torch.Tensor) -> torch.Tensor:
        loss = whisper_task_loss(model, {"t": name}, [batch], gathered={"t": copy})
        return loss(0, {"t": weight})

    assert float(kl(table.numpy(), table)) == pytest.approx(0.0, abs=1e-6)
    # The embedding reads the copy (the weight is the teacher's)...
    assert float(kl(table.numpy() + noise, table)) > 1e-4
    # ...and the logits read the weight (the copy is the teacher's), with gradients.
    bent = (table + torch.from_numpy(noise)).requires_grad_(True)
    value = kl(table.numpy(), bent)
    value.backward()
    assert float(value.detach()) > 1e-4
    assert bent.grad is not None and float(bent.grad.abs().sum()) > 0
    # The model's own tied parameter is untouched.
    assert torch.equal(dict(model.named_parameters())[name].detach().T, table)


def test_block_loss_is_zero_at_the_teachers_weights_and_trains_each_weight_by_its_block(
        tiny_hf) -> None:
    from types import SimpleNamespace

    from sfc.precision.onestage_whisper import whisper_task_loss

    model = tiny_hf.model
    params = dict(model.named_parameters())
    names = {"enc_fc1": "model.encoder.layers.0.fc1.weight",
             "cross_k": "model.decoder.layers.1.encoder_attn.k_proj.weight",
             "table": "model.decoder.embed_tokens.weight"}
    teacher = {n: params[p].detach().T.clone() for n, p in names.items()}
    rng = np.random.default_rng(2)
    batch = SimpleNamespace(features=rng.normal(size=(2, 80, 3000)).astype(np.float32),
                            tokens=np.array([[50257, 50362, 400, 318, 257, 50256],
                                             [50257, 50362, 11, 50256, 50256, 50256]]),
                            mask=np.array([[False, True, True, True, True],
                                           [False, True, True, False, False]]))
    loss = whisper_task_loss(model, names, [batch], objective="blocks")

    def grads(weights: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
        weights = {n: w.clone().requires_grad_(True) for n, w in weights.items()}
        value = loss(0, weights)
        value.backward()
        return float(value.detach()), {n: w.grad for n, w in weights.items()}

    at_teacher, base = grads(teacher)
    assert at_teacher == pytest.approx(0.0, abs=1e-6)
    for bent_name in names:  # one weight off the teacher: a loss, and only it trained
        bent = dict(teacher)
        bent[bent_name] = teacher[bent_name] + 0.05 * teacher[bent_name].abs().mean() * (
            torch.from_numpy(rng.normal(size=tuple(teacher[bent_name].shape))
                             .astype(np.float32)))
        value, got = grads(bent)
        assert value > 1e-5, bent_name
        assert float(got[bent_name].abs().max()) > 100 * float(base[bent_name].abs().max())
        assert all(torch.equal(got[n], base[n]) for n in names if n != bent_name), bent_name
    with pytest.raises(SfcError, match="in no encoder or decoder layer"):
        whisper_task_loss(model, {"pos": "model.decoder.embed_positions.weight"}, [batch],
                          objective="blocks")


def test_report_shows_a_one_stage_search() -> None:
    from sfc.precision.budget import Budget
    from sfc.precision.search import LayerChoice, SearchConfig, SearchResult
    from sfc.report import _precision

    config = SearchConfig(Budget(avg_bits=4.5), method="one-stage",
                          one_stage=OneStageConfig(steps=7, finetune_steps=3))
    options = ({"label": "8", "bits": 100, "sensitivity": 2.3, "proxy": None},
               {"label": "4/32", "bits": 50, "sensitivity": 0.1, "proxy": None})
    result = SearchResult(config, "one-stage", 0.0, 60.0, 12, 0,
                          (LayerChoice("decoder", "w", ("/fc1/MatMul",), 12, options, 1),),
                          None, 1.0, phases={"search": 41.6, "fine-tuning": 9.2})
    text = "\n".join(_precision(result.to_dict()))
    assert "## Mixed precision (one-stage)" in text
    assert "wall time: search 42 s, fine-tuning 9 s" in text
    assert "7 search steps, 3 fine-tuning steps" in text
    assert "**4/32**" in text


@pytest.mark.slow
def test_one_stage_whisper_build_stores_learned_weights_and_replays(tmp_path: Path) -> None:
    """Two search steps and one fine-tuning step on 4 clips (and their augmented copies):
    the build goes through the one recipe and QDQ writer, and replays byte for byte."""
    import json
    import shutil

    from sfc.build import ONE_STAGE_FILE, BuildConfig
    from sfc.eval import read_manifest
    from sfc.paths import BUNDLED_DATA
    from sfc.pipeline import compile_model
    from sfc.precision.budget import Budget
    from sfc.precision.onestage_whisper import audio_digest
    from sfc.precision.search import SearchConfig
    from sfc.quant.gptq import GptqConfig

    # Extra training audio (--train-data): two clips in a manifest folder of their own.
    extra = tmp_path / "extra"
    (extra / "audio").mkdir(parents=True)
    rows = []
    for u in read_manifest(BUNDLED_DATA / "calib")[-2:]:
        shutil.copy(u.audio, extra / "audio" / u.audio.name)
        rows.append(json.dumps({"audio": f"audio/{u.audio.name}", "text": "unused"}))
    (extra / "manifest.jsonl").write_text("\n".join(rows) + "\n")
    search = SearchConfig(Budget(avg_bits=5.0), method="one-stage",
                          one_stage=OneStageConfig(steps=2, finetune_steps=1))
    config = BuildConfig(weights="mixed", activations=None, search=search, calib_limit=4,
                         train_data=(extra,))
    compile_model("whisper-tiny.en", tmp_path / "b", config, eval_data=None)
    result = json.loads((tmp_path / "b" / ONE_STAGE_FILE).read_text())
    assert result["avg_bits"] <= 5.0 and len(result["chosen"]) == 65
    assert result["original_sha256"] != result["learned_sha256"]
    assert (tmp_path / "b" / "plots" / "onestage.png").is_file()
    assert "## Mixed precision (one-stage)" in (tmp_path / "b" / "report.md").read_text()
    for graph in ("encoder", "decoder"):
        recipe = json.loads((tmp_path / "b" / graph / "recipe.json").read_text())["_data"]
        methods = {t["method"] for t in recipe["tensors"] if t["kind"] == "weight"}
        assert "learned" in methods
        assert recipe["config"]["weights"]["method"] == "learned"
        # The fine-tuning started from GPTQ: its settings are part of the recipe.
        assert recipe["config"]["weights"]["gptq"] == GptqConfig().to_dict()
        assert recipe["config"]["weights"]["search"]["one_stage"]["finetune_init"] == "gptq"
        assert recipe["config"]["weights"]["learned"]["learned_sha256"] == \
            result["learned_sha256"]
        assert recipe["config"]["weights"]["learned"]["train_data_sha256"] == \
            audio_digest(read_manifest(extra))
    compile_model("whisper-tiny.en", tmp_path / "r", BuildConfig(recipe=tmp_path / "b"),
                  eval_data=None)
    for graph in ("encoder", "decoder"):
        assert (tmp_path / "r" / graph / "model.qdq.onnx").read_bytes() == \
            (tmp_path / "b" / graph / "model.qdq.onnx").read_bytes()


@pytest.mark.slow
def test_two_stage_with_fine_tuning_learns_the_chosen_formats_weights(tmp_path: Path) -> None:
    """`--finetune-steps` on a two-stage build: the program's formats stay as chosen, the
    weights at them are learned (recipe method "learned"), and the build replays."""
    import json

    from sfc.build import ONE_STAGE_FILE, BuildConfig
    from sfc.pipeline import compile_model
    from sfc.precision.budget import Budget
    from sfc.precision.search import RESULT_FILE, SearchConfig

    search = SearchConfig(Budget(avg_bits=4.5), sensitivity="proxy",
                          finetune=OneStageConfig(steps=0, finetune_steps=1))
    config = BuildConfig(weights="mixed", activations=None, search=search, calib_limit=2)
    compile_model("whisper-tiny.en", tmp_path / "b", config, eval_data=None)
    chosen = json.loads((tmp_path / "b" / RESULT_FILE).read_text())
    tuned = json.loads((tmp_path / "b" / ONE_STAGE_FILE).read_text())
    assert {f"{c['graph']}:{c['tensor']}": c["chosen"] for c in chosen["layers"]
            if f"{c['graph']}:{c['tensor']}" in tuned["chosen"]} == tuned["chosen"]
    assert len(tuned["chosen"]) == 65  # every MatMul weight (the convs keep INT8)
    assert chosen["config"]["finetune"]["finetune_steps"] == 1
    assert len(tuned["history"]) == 1 and tuned["history"][0]["probs"] is None
    assert tuned["original_sha256"] != tuned["learned_sha256"]
    for graph in ("encoder", "decoder"):
        recipe = json.loads((tmp_path / "b" / graph / "recipe.json").read_text())["_data"]
        weights = recipe["config"]["weights"]
        assert weights["method"] == "learned" and weights["search"]["finetune"]["steps"] == 0
        assert "learned" in {t["method"] for t in recipe["tensors"] if t["kind"] == "weight"}
    compile_model("whisper-tiny.en", tmp_path / "r", BuildConfig(recipe=tmp_path / "b"),
                  eval_data=None)
    for graph in ("encoder", "decoder"):
        assert (tmp_path / "r" / graph / "model.qdq.onnx").read_bytes() == \
            (tmp_path / "b" / graph / "model.qdq.onnx").read_bytes()


def _sharded_task(a: np.ndarray, b: np.ndarray):
    """`_task` written for data parallelism: each process's rows' squared error over the
    whole batch's normaliser, so the processes' losses sum to `_task`'s."""
    from sfc.precision.data_parallel import env_world, shard

    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    world = env_world()

    def loss(step: int, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        x = torch.from_numpy(np.random.default_rng(step).normal(size=(16, a.shape[0]))
                             .astype(np.float32))
        y = x @ ta + 1e-3 * (x @ tb)
        rows = shard(len(x), world)
        got = x[rows] @ weights["a"] + 1e-3 * (x[rows] @ weights["b"])
        return ((got - y[rows]) ** 2).sum() / y.numel() / (y ** 2).mean()
    return loss


DP_CONFIG = OneStageConfig(steps=40, finetune_steps=10)


def _dp_rank(rank: int, world: int, port: int, out: str) -> None:
    """One torchrun-like process: the environment torchrun sets, then the search."""
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    weights, allowed, params = _problem()
    result = one_stage_search(weights, _sharded_task(weights[0].value, weights[1].value),
                              bits_allowed=allowed, params=params, config=DP_CONFIG,
                              progress=False)
    np.savez(f"{out}/rank{rank}.npz", losses=[h["loss"] for h in result.history],
             **{f"{n}_q": q for n, (_, q, _) in result.weights.chosen.items()},
             **{f"{n}_bits": s.bits for n, (s, _, _) in result.weights.chosen.items()})


def test_two_processes_learn_what_one_does(tmp_path: Path) -> None:
    """torchrun's data parallelism (gloo, two processes on this machine): each process
    computes half of every step's batch, gradients are summed; both end with the same
    bits and integers, which are the one-process search's up to float summation order."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_dp_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in (0, 1))
    assert all(np.array_equal(r0[k], r1[k]) for k in r0.files)
    weights, allowed, params = _problem()
    alone = one_stage_search(weights, _sharded_task(weights[0].value, weights[1].value),
                             bits_allowed=allowed, params=params, config=DP_CONFIG,
                             progress=False)
    np.testing.assert_allclose(r0["losses"], [h["loss"] for h in alone.history], rtol=1e-3,
                               atol=1e-6)
    for n, (spec, q, _) in alone.weights.chosen.items():
        assert int(r0[f"{n}_bits"]) == spec.bits
        assert np.mean(r0[f"{n}_q"] != q) < 0.01  # a rounding flips where float sums differ


def test_torchrun_runs_only_the_one_stage_search_in_parallel(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sfc.build import BuildConfig
    from sfc.errors import SfcError
    from sfc.pipeline import compile_model

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SfcError, match="only --search one-stage in parallel"):
        compile_model("whisper-tiny.en", tmp_path / "b", BuildConfig(), eval_data=None)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(SfcError, match="RANK 2 does not fit WORLD_SIZE 2"):
        compile_model("whisper-tiny.en", tmp_path / "b", BuildConfig(), eval_data=None)
    assert not (tmp_path / "b").exists()
