"""benchmarks/timestamps.py: the per-recording paired comparison between paths."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import bench_module


@pytest.fixture(scope="module")
def ts() -> Any:
    return bench_module("timestamps")


def _row(ref: int, **errors: int) -> dict[str, Any]:
    return {path: {"counts": {"substitutions": e, "deletions": 0, "insertions": 0,
                              "ref_words": ref}} for path, e in errors.items()}


def test_paired_by_recording_compares_each_path_with_the_reference_path(ts: Any) -> None:
    rows = [_row(100, default=30 + i, same=30 + i, better=10 + i % 3) for i in range(10)]
    paired = ts.paired_by_recording(rows, ["default", "same", "better"], "default")
    assert set(paired) == {"same", "better"}  # the reference path is not compared with itself
    assert paired["same"]["delta"] == 0.0 and paired["same"]["p_value"] == 1.0
    better = paired["better"]
    # 10 recordings x 100 words: (sum 30..39 = 345) against (10,11,12,10,... = 109) errors
    assert better["delta"] == pytest.approx((109 - 345) / 1000)
    assert better["hi"] < 0 < 1 - better["p_value"]


def test_paired_by_recording_is_seeded(ts: Any) -> None:
    rows = [_row(50 + i, default=i % 4, other=(i * 7) % 5) for i in range(10)]
    first = ts.paired_by_recording(rows, ["default", "other"], "default")
    assert first == ts.paired_by_recording(rows, ["default", "other"], "default")


def _report(paths: dict[str, int], names: list[str]) -> dict[str, Any]:
    rows = []
    for name in names:
        row: dict[str, Any] = {"name": name, "seconds": 10.0}
        for path, errors in paths.items():
            row[path] = {**_row(100, **{path: errors})[path], "compute_s": 1.0,
                         "loop_stops": 0}
        rows.append(row)
    return {"recordings": rows, "summary": {"paths": list(paths)}}


def test_merge_adds_new_paths_replaces_same_names_and_recomputes_the_summary(ts: Any) -> None:
    old = _report({"default": 40, "vad": 30}, ["a", "b"])
    new = _report({"vad": 10, "seek": 20}, ["b", "a"])
    merged = ts.merge_long(old, new)
    s = merged["summary"]
    assert s["paths"] == ["default", "vad", "seek"]
    assert s["default"]["wer"] == pytest.approx(0.40)  # kept from the old report
    assert s["vad"]["wer"] == pytest.approx(0.10)  # the new run's, not the old one's
    assert s["seek"]["wer"] == pytest.approx(0.20)
    with pytest.raises(SystemExit, match="different recordings"):
        ts.merge_long(old, _report({"vad": 1}, ["a", "c"]))
