"""Sequential GPTQ (`--gptq-stages`): stage grouping and a build whose
second stage is calibrated on the first stage's quantized outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_precision import _config

from sfc.errors import SfcError
from sfc.pipeline import compile_model
from sfc.quant.gptq import GptqConfig, GramAccumulator, gptq_quantize
from sfc.quant.recipe import Recipe
from sfc.quant.sequential import stage_groups
from sfc.quant.stored import STORED_FILE, StoredWeights
from sfc.quant.weights import dequantize_weight
from tests.test_build import _feeds, _mlp


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SFC_CACHE", str(tmp_path / "cache"))


def test_stage_groups_are_contiguous_in_graph_order() -> None:
    position = {"c": 2, "a": 0, "e": 4, "b": 1, "d": 3}.__getitem__
    assert stage_groups("edcba", position, 2) == [["a", "b"], ["c", "d", "e"]]
    assert stage_groups("abcde", position, 3) == [["a", "b"], ["c"], ["d", "e"]]
    # More stages than inputs: one input each; one stage: everything together.
    assert stage_groups("bca", position, 9) == [["a"], ["b"], ["c"]]
    assert stage_groups("abc", position, 1) == [["a", "b", "c"]]
    assert stage_groups([], position, 4) == []
    for bad in (0, -1, 2.0, True):
        with pytest.raises(SfcError, match="stages must be a positive int"):
            stage_groups("ab", position, bad)


def test_config_stages_keep_old_recipes_readable() -> None:
    old = GptqConfig().to_dict()
    assert "stages" not in old and GptqConfig.from_dict(old) == GptqConfig()
    staged = GptqConfig(stages=3)
    assert staged.to_dict()["stages"] == 3 and GptqConfig.from_dict(staged.to_dict()) == staged
    for bad in (0, 1.5, True):
        with pytest.raises(SfcError, match="GPTQ stages"):
            GptqConfig(stages=bad)


def _stored(folder: Path) -> tuple[Recipe, dict[str, tuple[np.ndarray, np.ndarray]]]:
    model = folder / "model"
    recipe = Recipe.load(model / "recipe.json")
    assert recipe.weight_data is not None
    stored = StoredWeights.load(model / STORED_FILE, recipe.weight_data)
    shapes = {"w1": (64, 128), "w2": (128, 32)}
    out = {}
    for t in recipe.tensors:
        if t.kind == "weight":
            assert t.spec is not None
            out[t.tensor] = stored.get(t.tensor, t.spec, shapes[t.tensor])
    return recipe, out


def test_second_stage_is_calibrated_on_the_first_stages_quantized_outputs(
        tmp_path: Path) -> None:
    src, feeds = _mlp(tmp_path / "mlp.onnx"), _feeds(tmp_path / "feeds", n=12)
    for name, stages in (("one", 1), ("two", 2)):
        compile_model(str(src), tmp_path / name, _config(
            feeds, weights=4, weight_method="gptq", gptq=GptqConfig(stages=stages)),
            eval_data=None)
    recipe, seq = _stored(tmp_path / "two")
    _, plain = _stored(tmp_path / "one")
    assert recipe.config["weights"]["gptq"]["stages"] == 2
    # Stage 1 (fc1) sees the FP32 inputs either way.
    np.testing.assert_array_equal(seq["w1"][0], plain["w1"][0])

    # Independently: fc2's Gram from relu(x @ deq(w1)), then GPTQ at the recipe's spec.
    spec = next(t.spec for t in recipe.tensors if t.tensor == "w2")
    w1_spec = next(t.spec for t in recipe.tensors if t.tensor == "w1")
    assert spec is not None and w1_spec is not None
    deq1 = dequantize_weight(seq["w1"][0], w1_spec, seq["w1"][1])
    w2 = {t.name: numpy_helper.to_array(t)
          for t in onnx.load(str(src)).graph.initializer}["w2"]
    gram = GramAccumulator(128)
    for path in sorted(feeds.glob("*.npz")):
        with np.load(path) as data:
            gram.update(np.maximum(data["x"] @ deq1, 0))
    want, _ = gptq_quantize(w2, gram.gram, gram.count, spec, GptqConfig())
    # ORT's and numpy's float32 products differ in the last bits, which may flip a rare
    # rounding; the FP32-calibrated weights differ far more.
    assert np.mean(seq["w2"][0] == want) > 0.99
    assert np.mean(plain["w2"][0] != want) > 0.05
