"""benchmarks/ray_scaling.py's projection: ESC generations wait for their slowest round,
probes are one pool; the build's serial part stays."""

from __future__ import annotations

from typing import Any

from tests.conftest import bench_module

rs = bench_module("ray_scaling")


def _report(job: str, **one: Any) -> dict[str, Any]:
    return {"job": job, "builds": [{"workers": None, "seconds": 100.0, "tasks": 30,
                                    "build_s": 150.0},
                                   {"workers": 1, "build_s": 130.0, **one}]}


def test_esc_projection_counts_rounds_per_generation() -> None:
    # 2 generations of 15 at 2 s per task: 8 workers need 2 rounds per generation, 64 one.
    (line,) = rs.projection(_report("esc", seconds=60.0, tasks=30, generations=2))
    assert "2 generations of 15" in line and "2.00 s per task" in line
    assert "8 workers 8.0 s" in line and "64 workers 4.0 s" in line
    assert "other 70 s stay" in line and line.startswith("projection, not a measurement")


def test_probe_projection_is_one_pool() -> None:
    (line,) = rs.projection(_report("probes", seconds=131.0, tasks=131))
    assert "8 workers 17.0 s" in line and "64 workers 3.0 s" in line


def test_no_projection_without_a_one_worker_run() -> None:
    report = _report("esc", seconds=1.0, tasks=1)
    report["builds"] = report["builds"][:1]
    assert rs.projection(report) == []
