"""The recipe: byte-deterministic JSON, versioned envelope, validation of scales."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from test_quant_graphs import absmax_scales, feeds_for, speech_model

from sfc.errors import SfcError
from sfc.quant import (
    ORT_CPU_CAPS,
    PlanConfig,
    QuantSpec,
    Recipe,
    TensorRecipe,
    make_plan,
    model_sha256,
    recipe_from_plan,
)


def _recipe(config: PlanConfig | None = None) -> Recipe:
    config = config or PlanConfig(weight_bits=4, quantize_attention=True)
    model = speech_model()
    plan = make_plan(model, config, ORT_CPU_CAPS)
    scales = absmax_scales(model, feeds_for(model), [q.tensor for q in plan.activations])
    settings = {**config.to_dict(), "calibrator": {"method": "max", "batches": 1}}
    return recipe_from_plan(plan, scales, model_sha256(model), 7, settings)


def test_recipe_from_plan_carries_every_decision() -> None:
    recipe = _recipe()
    assert recipe.seed == 7 and recipe.config["calibrator"]["method"] == "max"
    weight = recipe.get("q.w")
    assert weight is not None and weight.kind == "weight" and weight.scale is None
    assert weight.method == "mse" and weight.spec.granularity == "block"
    assert "weight-only" in weight.note
    conv = recipe.get("conv.w")
    assert conv is not None and conv.method == "absmax" and "fell back" in conv.note
    act = recipe.get("probs")
    assert act is not None and act.scale is not None and act.scale > 0
    assert act.consumers == ("attn_av",) and act.stats["n_values"] == 32 * 32
    assert any(s.node == "softmax" for s in recipe.skipped)


def test_json_round_trip_is_byte_identical(tmp_path: Path) -> None:
    recipe = _recipe()
    text = recipe.to_json()
    assert text.endswith("}\n")
    envelope = json.loads(text)
    assert envelope["_type"] == "Recipe" and envelope["_version"] == 2
    assert list(envelope) == sorted(envelope)  # sorted keys
    again = Recipe.from_json(text)
    assert again == recipe
    assert again.to_json() == text
    assert _recipe().to_json() == text  # same inputs -> same bytes
    path = tmp_path / "out" / "recipe.json"
    recipe.save(path)
    assert path.read_bytes() == text.encode()
    assert Recipe.load(path) == recipe
    assert [p.name for p in path.parent.iterdir()] == ["recipe.json"]  # no temp left


def test_floats_use_repr() -> None:
    recipe = _recipe(PlanConfig())
    scale = recipe.get("ln")
    assert scale is not None and scale.scale is not None
    assert f'"scale": {scale.scale!r}' in recipe.to_json()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda e: {**e, "_type": "Plan"}, "not a recipe"),
        (lambda e: {**e, "_version": 3}, "version 3 is not supported"),
        (lambda e: {k: v for k, v in e.items() if k != "_version"}, "version None"),
        (lambda e: {**e, "_data": {}}, "malformed recipe"),
    ],
)
def test_foreign_documents_are_rejected(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    envelope = json.loads(_recipe(PlanConfig()).to_json())
    with pytest.raises(SfcError, match=message):
        Recipe.from_json(json.dumps(mutate(envelope)))
    with pytest.raises(SfcError, match="not valid JSON"):
        Recipe.from_json("{")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 0.0, -0.5])
def test_bad_activation_scale_names_the_tensor(bad: float) -> None:
    model = speech_model()
    plan = make_plan(model, PlanConfig(), ORT_CPU_CAPS)
    scales = absmax_scales(model, feeds_for(model), [q.tensor for q in plan.activations])
    scales["res"] = (bad, "max", {})
    with pytest.raises(SfcError, match="'res'"):
        recipe_from_plan(plan, scales, model_sha256(model), 0, {})


def test_missing_activation_scale_names_the_tensor() -> None:
    model = speech_model()
    plan = make_plan(model, PlanConfig(), ORT_CPU_CAPS)
    scales = absmax_scales(model, feeds_for(model), [q.tensor for q in plan.activations])
    del scales["act"]
    with pytest.raises(SfcError, match="no activation scale for 'act'"):
        recipe_from_plan(plan, scales, model_sha256(model), 0, {})


def test_numpy_scalars_become_json_numbers() -> None:
    model = speech_model()
    plan = make_plan(model, PlanConfig(), ORT_CPU_CAPS)
    scales = {
        q.tensor: (np.float32(0.01), "max", {"absmax": np.float32(1.27), "n": np.int64(5)})
        for q in plan.activations
    }
    recipe = recipe_from_plan(plan, scales, model_sha256(model), 0, {})
    assert Recipe.from_json(recipe.to_json()) == recipe


def test_validation() -> None:
    spec = QuantSpec(8, "tensor")
    with pytest.raises(SfcError, match=r"'x'.*finite and > 0"):
        TensorRecipe("x", "activation", spec, "max", ("n",), scale=float("nan"))
    with pytest.raises(SfcError, match="stores no scale"):
        TensorRecipe("w", "weight", QuantSpec(8, "channel", 0), "absmax", ("n",), scale=1.0)
    with pytest.raises(SfcError, match="stats"):
        TensorRecipe("x", "activation", spec, "max", ("n",), scale=1.0, stats={"a": math.inf})
    with pytest.raises(SfcError, match="64 lowercase hex"):
        Recipe("abc", 0, {}, ())
    with pytest.raises(SfcError, match="plain JSON"):
        Recipe("0" * 64, 0, {"x": object()}, ())
    with pytest.raises(SfcError, match="unknown method"):
        TensorRecipe("w", "weight", QuantSpec(8, "channel", 0), "nope", ("n",))
    stored = TensorRecipe("w", "weight", QuantSpec(4, "block", 0, 32), "gptq", ("n",))
    with pytest.raises(SfcError, match="weight_data must be given exactly"):
        Recipe("0" * 64, 0, {}, (stored,))  # stored integers without their digest
    with pytest.raises(SfcError, match="weight_data must be given exactly"):
        Recipe("0" * 64, 0, {}, (), weight_data="1" * 64)


def test_weight_method_overrides() -> None:
    model = speech_model()
    plan = make_plan(model, PlanConfig(), ORT_CPU_CAPS)
    scales = absmax_scales(model, feeds_for(model), [q.tensor for q in plan.activations])
    recipe = recipe_from_plan(plan, scales, model_sha256(model), 0, {}, {"fc2.w": "mse"})
    assert recipe.get("fc2.w").method == "mse"  # type: ignore[union-attr]
    assert recipe.get("fc1.w").method == "absmax"  # type: ignore[union-attr]
    with pytest.raises(SfcError, match="'nope'"):
        recipe_from_plan(plan, scales, model_sha256(model), 0, {}, {"nope": "mse"})
