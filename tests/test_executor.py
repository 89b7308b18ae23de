"""ESC's executors: in-process and Ray (a local two-worker cluster the tests start) give the
same search, byte for byte; a dying worker is replaced; a dead address is one line."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sfc.build import BuildConfig, target_caps
from sfc.calib import EscCalib
from sfc.calib.esc import EscResult, esc_search
from sfc.calib.inferred_feeds import FeedSource
from sfc.calib.objectives import GraphSetup, ObjectiveSpec, objective_spec
from sfc.card import ModelCard
from sfc.errors import SfcError
from sfc.executor import InProcess, RayExecutor
from sfc.pipeline import compile_model
from sfc.precision.budget import Budget
from sfc.precision.search import SearchConfig
from sfc.quant import PlanConfig, make_plan, model_sha256, recipe_from_plan
from tests.test_build import _feeds as _build_feeds
from tests.test_build import _mlp

ray = pytest.importorskip("ray", reason="the Ray executor needs ray (pip install 'sfc[ray]')")

CONFIG = EscCalib(budget=24, popsize=6, sigma0=0.3)


def _model() -> onnx.ModelProto:
    """x[n, 16] -> fc1 -> h[n, 32] -> fc2 -> y[n, 8], two outlier channels in h."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 32)).astype(np.float32) * 0.3
    w1[:, :2] *= 50.0
    w2 = rng.standard_normal((32, 8)).astype(np.float32) * 0.3
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(
        nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _feeds() -> Iterator[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    for _ in range(4):
        yield {"x": rng.standard_normal((32, 16)).astype(np.float32)}


@pytest.fixture(scope="module")
def spec() -> ObjectiveSpec:
    """The distortion objective's spec with real ScaledSessions (what a build ships)."""
    model = _model()
    plan = make_plan(model, PlanConfig(), target_caps("ort-cpu"))
    scales = {"x": (0.03, "max", {}), "h": (0.5, "max", {})}
    recipe = recipe_from_plan(plan, scales, model_sha256(model), 0, {})
    card = ModelCard(name="m", family="generic", graphs={}, objective="distortion")
    return objective_spec("distortion", card, {"model": GraphSetup(model, recipe, ("x", "h"))},
                          samples=4, feeds={"model": FeedSource("test", _feeds, 4)})


START = {"model:x": 0.03, "model:h": 0.5}


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """One local two-CPU Ray for the module (starting Ray takes seconds)."""
    # The dying objective below is defined here, not in an installed module: ship it by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _search(spec: ObjectiveSpec, executor: Any) -> Any:
    objective = spec.make()
    try:
        return esc_search(START, objective, CONFIG, seed=5, progress=False, executor=executor)
    finally:
        objective.close()


def test_ray_build_is_byte_identical_to_in_process(cluster: None, tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(_model(), str(src))
    feeds = tmp_path / "feeds"
    feeds.mkdir()
    for i, feed in enumerate(_feeds()):
        np.savez(feeds / f"{i}.npz", **feed)
    results = []
    for name, workers in (("local", None), ("ray", 2)):
        config = BuildConfig(calibrator="esc", calib=feeds, esc_budget=24, esc_popsize=6,
                             seed=3, workers=workers)
        compile_model(str(src), tmp_path / name, config, eval_data=None)
        results.append(EscResult.load(tmp_path / name / "esc.json"))
    local, remote = results
    assert remote.evaluations == local.evaluations == 24
    assert remote.values == local.values and remote.trace == local.trace
    assert remote.scales == local.scales and remote.final_objective == local.final_objective
    assert local.final_objective < local.start_objective
    assert (tmp_path / "ray/model/recipe.json").read_bytes() == \
        (tmp_path / "local/model/recipe.json").read_bytes()


def test_ray_mixed_build_probes_match_in_process(cluster: None, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Two-stage probes on two Ray workers: the same sensitivities, bits and recipes."""
    src, feeds = _mlp(tmp_path / "mlp.onnx"), _build_feeds(tmp_path / "feeds")
    search = SearchConfig(Budget(avg_bits=5.0), candidates=("8", "4/32", "2/32"), samples=3)
    for name, workers in (("local", None), ("ray", 2)):
        config = BuildConfig(target="sim", activations=None, calibrator="mse", calib=feeds,
                             weights="mixed", search=search, workers=workers)
        # A private cache each: the second build must measure its probes, not read them.
        monkeypatch.setenv("SFC_CACHE", str(tmp_path / f"cache-{name}"))
        compile_model(str(src), tmp_path / name, config, eval_data=None)
    local = json.loads((tmp_path / "local/precision.json").read_text())
    remote = json.loads((tmp_path / "ray/precision.json").read_text())
    assert [c["options"] for c in remote["layers"]] == [c["options"] for c in local["layers"]]
    assert any(o["sensitivity"] > 0 for c in local["layers"] for o in c["options"])
    assert (tmp_path / "ray/model/recipe.json").read_bytes() == \
        (tmp_path / "local/model/recipe.json").read_bytes()


def test_ray_options_fail_before_calibration(tmp_path: Path) -> None:
    with pytest.raises(SfcError, match="apply to --calibrator esc and to --weights mixed"):
        BuildConfig(calibrator="mse", workers=2)
    one_stage = SearchConfig(Budget(avg_bits=4.0), method="one-stage")
    with pytest.raises(SfcError, match="apply to --calibrator esc and to --weights mixed"):
        BuildConfig(calibrator="mse", activations=None, weights="mixed", search=one_stage,
                    workers=2)
    with pytest.raises(SfcError, match="integer >= 1"):
        BuildConfig(workers=0)
    with pytest.raises(SfcError, match="auto or HOST:PORT"):
        BuildConfig(ray_address="somewhere")


class _DiesOnce:
    """An objective whose worker process exits on its `after`-th call while `flag` exists
    (the first worker to remove the file dies; the others carry on)."""

    def __init__(self, inner: Any, flag: str, after: int) -> None:
        self.inner, self.flag, self.after, self.calls = inner, flag, after, 0

    def __call__(self, scales: Mapping[str, float]) -> float:
        self.calls += 1
        if self.calls == self.after:
            try:
                os.unlink(self.flag)
            except FileNotFoundError:
                pass
            else:
                os._exit(1)
        return float(self.inner(scales))


@dataclass(frozen=True)
class _Dying:
    spec: ObjectiveSpec
    flag: str
    after: int

    def make(self, threads: int | None = None) -> _DiesOnce:
        return _DiesOnce(self.spec.make(threads), self.flag, self.after)


@pytest.mark.slow  # three workers start: ~17 s on two busy cores
def test_a_worker_killed_mid_generation_is_replaced(spec: ObjectiveSpec, cluster: None,
                                                    tmp_path: Path) -> None:
    local = _search(spec, None)
    flag = tmp_path / "die"
    flag.touch()
    executor = RayExecutor(_Dying(spec, str(flag), after=5), workers=2)
    try:
        assert executor.threads == 1  # two cores, two workers
        remote = _search(spec, executor)
        rss = executor.peak_rss()
    finally:
        executor.close()
    assert not flag.exists()  # a worker did die, in the second generation
    assert remote.values == local.values and remote.trace == local.trace
    assert remote.scales == local.scales
    assert len(rss) == 2 and all(r > 0 for r in rss)


def _exit(scales: Mapping[str, float]) -> float:
    os._exit(1)


@dataclass(frozen=True)
class _Fatal:
    """Objectives that kill their worker on every call (no sessions: workers start fast)."""

    def make(self, threads: int | None = None) -> Any:
        return _exit


def test_a_candidate_that_kills_every_worker_is_one_line(cluster: None) -> None:
    executor = RayExecutor(_Fatal(), workers=1, retries=1)
    try:
        with pytest.raises(SfcError, match="died 2 times") as caught:
            list(executor.evaluate([START]))
    finally:
        executor.close()
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("address", ["127.0.0.1:1", "192.0.2.1:6379"])
def test_an_address_that_does_not_answer_is_one_line(spec: ObjectiveSpec, address: str) -> None:
    began = time.perf_counter()
    with pytest.raises(SfcError, match="no Ray cluster answers") as caught:
        RayExecutor(spec, address=address)
    assert time.perf_counter() - began < 10
    assert "\n" not in str(caught.value)


def test_in_process_yields_lazily() -> None:
    calls: list[float] = []

    def objective(scales: Mapping[str, float]) -> float:
        calls.append(scales["a"])
        return scales["a"]

    values = InProcess(objective).evaluate([{"a": 1.0}, {"a": 2.0}])
    assert next(values) == 1.0 and calls == [1.0]  # Ctrl-C after one keeps that one


def test_evaluation_shards_on_ray_give_the_in_process_transcripts(
        cluster: None, tiny_export: Path) -> None:
    """`sfc eval --workers 2`: utterances spread over two workers, scored in manifest order,
    with the transcripts and WER of the in-process evaluation."""
    from sfc.eval import evaluate, read_manifest
    from sfc.eval.shards import TranscriberSpec
    from tests.conftest import EVAL_DATA

    utterances = read_manifest(EVAL_DATA)[:4]
    spec = TranscriberSpec(tiny_export)
    here = evaluate(None, utterances, model="m", data="d", progress=False,
                    executor=InProcess(spec.make()))
    executor = RayExecutor(spec, workers=2)
    try:
        remote = evaluate(None, utterances, model="m", data="d", progress=False,
                          executor=executor)
    finally:
        executor.close()
    assert [u.id for u in remote.utterances] == [u.id for u in utterances]
    assert [u.hypothesis for u in remote.utterances] == [u.hypothesis for u in here.utterances]
    assert remote.wer == here.wer and 0 < here.wer < 0.5
