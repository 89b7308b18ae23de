"""Crash safety of the searches: ESC and the two-stage mixed-precision probes resume from
their checkpoints after a crash and end with the result of an uninterrupted run."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sfc.calib.esc import EscCalib, EscResult, esc_search


class Crash(Exception):
    """A crash mid-search (a killed process leaves the same files behind)."""


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints go under $SFC_CACHE: each test has its own."""
    monkeypatch.setenv("SFC_CACHE", str(tmp_path / "cache"))


TARGET = {"g:a": 2.0, "g:b": 0.5, "g:c": 1.5, "g:d": 0.8}
START = dict.fromkeys(TARGET, 1.0)
CONFIG = EscCalib(budget=40, popsize=5, sigma0=0.3, stall=100)


def _quadratic(scales: Mapping[str, float]) -> float:
    return sum((math.log(scales[k]) - math.log(v)) ** 2 for k, v in TARGET.items())


def _counting(calls: list[int], crash_at: int | None = None
              ) -> Callable[[Mapping[str, float]], float]:
    """The quadratic, counting its calls; raises `Crash` at call `crash_at` (1: the start)."""
    def objective(scales: Mapping[str, float]) -> float:
        calls.append(1)
        if len(calls) == crash_at:
            raise Crash
        return _quadratic(scales)

    return objective


def _search(folder: Path, objective: Callable[[Mapping[str, float]], float],
            start: Mapping[str, float] = START, seed: int = 3,
            identity: str = "data") -> EscResult:
    return esc_search(start, objective, CONFIG, seed, objective_name="quadratic",
                      progress=False, checkpoints=folder, identity=identity)


def _same(a: EscResult, b: EscResult) -> bool:
    return replace(a, seconds=0.0) == replace(b, seconds=0.0)


@pytest.fixture(scope="module")
def reference() -> EscResult:
    """The uninterrupted search (no checkpoints)."""
    return esc_search(START, _quadratic, CONFIG, 3, objective_name="quadratic", progress=False)


# Calls: 1 is the start, then 5 candidates per generation. 2: the first candidate;
# 6: the last of generation 1 (nothing saved yet); 7: right after the generation-1
# checkpoint; 9 and 14: mid-generation; 36: the last generation.
@pytest.mark.parametrize("crash_at", [2, 6, 7, 9, 14, 36])
def test_search_resumes_after_a_crash_with_the_same_result(
        tmp_path: Path, reference: EscResult, crash_at: int,
        caplog: pytest.LogCaptureFixture) -> None:
    assert reference.evaluations == 40 and reference.generations == 8
    folder = tmp_path / "esc"
    with pytest.raises(Crash):
        _search(folder, _counting([], crash_at))
    saved = (crash_at - 2) // 5  # whole generations before the crash
    assert len(list(folder.glob("*.pkl"))) == (1 if saved else 0)
    np.random.seed(12345)  # cma's global generator plays no part in the search
    calls: list[int] = []
    resumed = _search(folder, _counting(calls))
    assert _same(resumed, reference)
    assert json.dumps(resumed.to_dict()["_data"]["scales"]) == \
        json.dumps(reference.to_dict()["_data"]["scales"])
    # The start and the final mean, plus every candidate after the last saved generation.
    assert len(calls) == (2 if not saved else 1) + 40 - 5 * saved
    resuming = [r.getMessage() for r in caplog.records if "resuming ESC" in r.getMessage()]
    assert resuming == ([f"resuming ESC from checkpoint: {5 * saved} evaluations done"]
                        if saved else [])
    assert not list(folder.iterdir())  # a completed search leaves no checkpoint


def test_crash_during_the_final_evaluation_spends_only_that(tmp_path: Path,
                                                           reference: EscResult) -> None:
    folder = tmp_path / "esc"
    with pytest.raises(Crash):
        _search(folder, _counting([], 42))  # the start, 40 candidates, the final mean
    calls: list[int] = []
    assert _same(_search(folder, _counting(calls)), reference) and len(calls) == 1


def test_stall_and_ctrl_c_resume_the_same_way(tmp_path: Path) -> None:
    """A search that stops on stall decides it again after a resume; Ctrl-C keeps the
    checkpoint, so the same call then finishes the search."""
    config = replace(CONFIG, stall=7)

    def stalled(scales: Mapping[str, float]) -> float:  # nothing beats the start
        return 1.0 if dict(scales) == START else 2.0 + _quadratic(scales)

    ref = esc_search(START, stalled, config, 0, progress=False)
    assert ref.generations == 2 and ref.evaluations == 10
    folder = tmp_path / "esc"
    calls: list[int] = []

    def interrupted(scales: Mapping[str, float]) -> float:
        calls.append(1)
        if len(calls) == 8:  # after the start, generation 1 and one candidate more
            raise KeyboardInterrupt
        return stalled(scales)

    stopped = esc_search(START, interrupted, config, 0, progress=False, checkpoints=folder)
    assert stopped.interrupted and stopped.evaluations == 6
    assert len(list(folder.glob("*.pkl"))) == 1  # kept for the next run
    again = esc_search(START, stalled, config, 0, progress=False, checkpoints=folder)
    assert _same(again, ref) and not list(folder.iterdir())


def test_another_search_ignores_the_checkpoint(tmp_path: Path, reference: EscResult) -> None:
    folder = tmp_path / "esc"
    with pytest.raises(Crash):
        _search(folder, _counting([], 20))
    for changed in ({"seed": 4}, {"start": dict(START, **{"g:a": 1.1})},
                    {"identity": "other data"}):
        calls: list[int] = []
        _search(folder, _counting(calls), **changed)  # type: ignore[arg-type]
        assert len(calls) == 42  # searched afresh
    # The first search's checkpoint is still there, and still resumes it.
    calls = []
    assert _same(_search(folder, _counting(calls)), reference) and len(calls) < 42


@pytest.mark.parametrize("damage", [b"", b"not a pickle", None])
def test_a_damaged_checkpoint_is_ignored(tmp_path: Path, reference: EscResult,
                                         damage: bytes | None,
                                         caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "esc"
    with pytest.raises(Crash):
        _search(folder, _counting([], 20))
    (saved,) = folder.glob("*.pkl")
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2] if damage is None else damage)
    calls: list[int] = []
    assert _same(_search(folder, _counting(calls)), reference) and len(calls) == 42
    assert any("ignoring the unreadable ESC checkpoint" in r.getMessage()
               for r in caplog.records)


def test_esc_build_resumes_after_a_crash(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the build: a crash mid-ESC, then the same build, gives the recipe of an
    uninterrupted build, byte for byte, from the checkpoint under $SFC_CACHE/esc."""
    from sfc.build import BuildConfig, build
    from sfc.calib.objectives import DistortionObjective
    from tests.test_esc import _feeds, _outlier_file

    src, feeds = _outlier_file(tmp_path / "m.onnx"), _feeds(tmp_path / "feeds")
    config = BuildConfig(calibrator="esc", calib=feeds, esc_budget=30, seed=0)
    build(str(src), tmp_path / "a", config)
    real = DistortionObjective.__call__
    calls: list[int] = []
    crash_at: list[int | None] = [12]  # the start, then mid-generation 2 (popsize 6)

    def flaky(self: DistortionObjective, scales: Mapping[str, float]) -> float:
        calls.append(1)
        if len(calls) == crash_at[0]:
            raise Crash
        return real(self, scales)

    monkeypatch.setattr(DistortionObjective, "__call__", flaky)
    with pytest.raises(Crash):
        build(str(src), tmp_path / "b", config)
    assert len(list((tmp_path / "cache" / "esc").glob("*.pkl"))) == 1
    calls.clear()
    crash_at[0] = None
    build(str(src), tmp_path / "b", config)
    assert len(calls) == 1 + 30 - 6  # the final mean, and generations 2 to 5
    for name in ("model/recipe.json", "esc.json"):
        a, b = (json.loads((tmp_path / x / name).read_text()) for x in "ab")
        if name == "esc.json":
            a["_data"]["seconds"] = b["_data"]["seconds"] = 0.0
        assert a == b
    assert (tmp_path / "a/model/recipe.json").read_bytes() == \
        (tmp_path / "b/model/recipe.json").read_bytes()
    assert not list((tmp_path / "cache" / "esc").iterdir())


# ---------------------------------------------------------------- mixed precision


def test_mixed_precision_probes_resume_after_a_crash(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A two-stage mixed build that crashes mid-probes, run again, chooses the same bits
    as an uninterrupted build, measuring only the probes the crash left undone."""
    import sfc.calib.objectives as objectives
    from sfc.build import BuildConfig, build
    from sfc.precision.budget import Budget
    from sfc.precision.search import SearchConfig
    from tests.test_build import _feeds, _mlp

    src, feeds = _mlp(tmp_path / "mlp.onnx"), _feeds(tmp_path / "feeds")
    search = SearchConfig(Budget(avg_bits=4.0), candidates=("8", "4/32", "2/32"), samples=3)
    config = BuildConfig(target="sim", activations=None, calibrator="mse", calib=feeds,
                         weights="mixed", search=search, weight_method="gptq")
    real = objectives.ObjectiveSpec.make
    calls: list[int] = []
    crash_at: list[int | None] = [None]

    class Counted:
        def __init__(self, inner: Any) -> None:
            self.inner, self.name = inner, inner.name

        def __call__(self, scales: Mapping[str, float]) -> float:
            calls.append(1)
            if len(calls) == crash_at[0]:
                raise Crash
            return self.inner(scales)

        def close(self) -> None:
            self.inner.close()

    def counted(self: Any, threads: int | None = None) -> Counted:
        return Counted(real(self, threads))

    monkeypatch.setattr(objectives.ObjectiveSpec, "make", counted)

    def chosen(out: Path) -> dict[str, str]:
        data = json.loads((out / "precision.json").read_text())
        return {layer["tensor"]: layer["chosen"] for layer in data["layers"]}

    build(str(src), tmp_path / "a", config)
    whole = len(calls)
    probes = tmp_path / "cache" / "probes"
    for checkpoint in probes.glob("*.json"):
        checkpoint.unlink()  # the next build measures afresh
    calls.clear()
    crash_at[0] = 3  # the FP32 probe and one weight probe are saved
    with pytest.raises(Crash):
        build(str(src), tmp_path / "b", config)
    (checkpoint,) = probes.glob("*.json")
    assert len(json.loads(checkpoint.read_text())["probes"]) == 2
    calls.clear()
    crash_at[0] = None
    build(str(src), tmp_path / "b", config)
    assert len(calls) == whole - 2
    assert chosen(tmp_path / "b") == chosen(tmp_path / "a")
    assert (tmp_path / "b/model/recipe.json").read_bytes() == \
        (tmp_path / "a/model/recipe.json").read_bytes()
