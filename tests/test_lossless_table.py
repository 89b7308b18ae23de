"""benchmarks/lossless_table.py: paired cells per (seed, set), the verdict, the table rows
and the seed-blind recipe comparison (no build, no model)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from sfc.eval.results import EvalResult, UtteranceResult, summarize
from tests.conftest import bench_module

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def lt() -> Any:
    """The script as a module (it imports its siblings `common` and `heldout_set`)."""
    return bench_module("lossless_table")


def _result(errors: Sequence[int], words: int = 10) -> EvalResult:
    utts = [UtteranceResult(id=f"u{i}", voice="v", condition="clean", reference="r",
                            hypothesis="h", substitutions=e, deletions=0, insertions=0,
                            ref_words=words, audio_s=1.0, compute_s=0.1)
            for i, e in enumerate(errors)]
    return summarize("m", "d", utts, seed=0, n_resamples=200)


FP32 = [0, 1, 0, 2, 0, 1, 0, 0, 1, 0] * 4


def test_equal_errors_are_lossless_and_a_uniform_loss_is_not(lt: Any) -> None:
    ref = {(0, "eval"): _result(FP32), (0, "heldout"): _result(FP32)}
    worse = {(0, "eval"): _result(FP32), (0, "heldout"): _result([e + 2 for e in FP32])}
    table = lt.cells(ref, worse)
    assert [(c.seed, c.set) for c in table] == [(0, "eval"), (0, "heldout")]
    assert table[0].includes_zero and table[0].delta == 0.0
    assert not table[1].includes_zero
    assert table[1].delta == pytest.approx(0.2) and table[1].lo > 0
    assert lt.verdict(table) is False
    assert lt.verdict(table[:1]) is True
    assert lt.verdict([]) is None


def test_cells_cover_only_the_pairs_both_sides_have(lt: Any) -> None:
    ref = {(s, "eval"): _result(FP32) for s in (0, 1, 2)}
    built = {(s, "eval"): _result(FP32) for s in (2, 0)}
    assert [c.seed for c in lt.cells(ref, built)] == [0, 2]


def test_rows_mark_shared_recipes_and_missing_cells(lt: Any) -> None:
    ref = {(s, "eval"): _result(FP32) for s in (0, 1)}
    ref[(0, "heldout")] = _result(FP32)
    built = {k: _result([e + 2 for e in FP32]) for k in ref}
    rows = lt.table_rows(lt.cells(ref, built), ["eval", "heldout"], {1: 0})
    assert rows[0][0] == "0" and rows[1][0] == "1 (= seed 0)"
    assert rows[0][1].startswith("+20.00 [") and rows[0][1].endswith("NO")
    assert rows[1][2] == "-"


def _recipe(folder: Path, graph: str, seed: int, scale: float) -> None:
    (folder / graph).mkdir(parents=True)
    data = {"seed": seed, "model_sha256": "0" * 64, "tensors": [{"scale": scale}]}
    (folder / graph / "recipe.json").write_text(json.dumps({"_type": "Recipe", "_data": data}))


def test_recipe_key_ignores_the_seed_only(lt: Any, tmp_path: Path) -> None:
    for seed, scale in ((0, 0.5), (1, 0.5), (2, 0.25)):
        _recipe(tmp_path / f"s{seed}", "encoder", seed, scale)
    assert lt.recipe_key(tmp_path / "s0") == lt.recipe_key(tmp_path / "s1")
    assert lt.recipe_key(tmp_path / "s0") != lt.recipe_key(tmp_path / "s2")


def test_a_set_with_other_audio_has_another_digest(lt: Any, tmp_path: Path) -> None:
    """Evaluations are filed by the set's digest: the same files elsewhere share it, one
    changed byte (a render on another machine) does not."""
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        (folder / "audio").mkdir(parents=True)
        (folder / "manifest.jsonl").write_text('{"id": "u0"}\n')
        (folder / "audio" / "u0.flac").write_bytes(b"\x00\x01\x02")
    assert lt.set_digest(a) == lt.set_digest(b)
    (b / "audio" / "u0.flac").write_bytes(b"\x00\x01\x03")
    assert lt.set_digest(a) != lt.set_digest(b)


def test_builds_of_evaluates_another_configurations_builds_with_eval_args(
        lt: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--builds-of OTHER --eval-arg=...`: OTHER's builds are evaluated again with the extra
    `sfc eval` options, FP32 without them, and nothing is built."""
    heldout, work = tmp_path / "heldout", tmp_path / "work"
    (heldout / "audio").mkdir(parents=True)
    (heldout / "manifest.jsonl").write_text('{"id": "u0"}\n')
    seed0 = work / "builds" / "default" / "seed0"
    seed0.mkdir(parents=True)
    (seed0 / "report.json").write_text(json.dumps({"_data": {"build_s": 12.5}}))
    calls: list[tuple[str, str, list[str]]] = []

    def fake_evaluate(model: str, data: Path, out: Path, limit: int | None,
                      threads: int | None, extra: Sequence[str] = ()) -> EvalResult:
        calls.append((model, out.name, list(extra)))
        return _result(FP32 if model == "whisper-tiny.en" else [e + 2 for e in FP32])

    monkeypatch.setattr(lt, "evaluate", fake_evaluate)
    monkeypatch.setattr(lt, "_run", lambda cmd, log: pytest.fail(f"ran {cmd}"))
    common = ["--seeds", "0", "--heldout", str(heldout), "--work", str(work)]
    out = tmp_path / "fit.json"
    assert lt.main(["fit", "--builds-of", "default", "--eval-arg=--encoder-window",
                    "--eval-arg=fit", *common, "--json", str(out)]) == 0
    fp32 = [c for c in calls if c[0] == "whisper-tiny.en"]
    built = [c for c in calls if c[0] != "whisper-tiny.en"]
    assert len(fp32) == 2 and all(c[2] == [] for c in fp32)
    assert [c[0] for c in built] == [str(seed0.resolve())] * 2
    assert all(c[2] == ["--encoder-window", "fit"] and c[1].startswith("fit-seed0-")
               for c in built)
    report = json.loads(out.read_text())
    assert (report["builds_of"], report["eval_args"]) == ("default", ["--encoder-window", "fit"])
    assert report["lossless"] is False and report["seeds"][0]["build_s"] == 12.5
    with pytest.raises(SystemExit) as usage:  # build options cannot apply to finished builds
        lt.main(["fit3", "--builds-of", "default", *common, "--", "--calibrator", "mse"])
    assert usage.value.code == 2
    with pytest.raises(SystemExit, match="no finished build of missing"):
        lt.main(["fit2", "--builds-of", "missing", *common, "--json", str(tmp_path / "x.json")])
