"""trtexec performance summaries: TensorRT 8.4, the newer percentile format, a partial
paste and a cut log (real logs in tests/fixtures/trtexec/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sfc.bench.trtexec import (
    TimeStats,
    TrtexecSummary,
    load_trtexec,
    parse_trtexec,
    render_trtexec,
)
from sfc.errors import SfcError

FIXTURES = Path(__file__).parent / "fixtures" / "trtexec"


def test_tensorrt_8_4_xavier() -> None:
    s = load_trtexec(FIXTURES / "xavier_trt8.4.txt")
    assert s.throughput_qps == 41087.7
    assert s.latency == TimeStats(0.387207, 0.447357, 0.402238, 0.401947, ((99.0, 0.420288),))
    assert s.enqueue == TimeStats(0.0830078, 0.229004, 0.090497, 0.0871582, ((99.0, 0.126099),))
    assert s.h2d is not None and s.h2d.percentile(99) == 0.0272217
    assert s.gpu_compute is not None and s.gpu_compute.median == 0.388443
    assert s.d2h is not None and s.d2h.max == 0.00537109
    assert (s.host_walltime_s, s.gpu_compute_s) == (3.00119, 2.99202)
    assert s.missing == ()


def test_newer_format_with_three_percentiles() -> None:
    s = load_trtexec(FIXTURES / "desktop_percentiles.txt")
    assert s.latency is not None and s.latency.percentiles == (
        (90.0, 30.8303), (95.0, 30.8396), (99.0, 30.8523))
    assert s.gpu_compute is not None and s.gpu_compute.percentile(95) == 30.4156
    assert s.latency.percentile(50) is None  # not printed
    assert s.host_walltime_s == 3.08622
    assert s.missing == ("Enqueue Time", "H2D Latency", "D2H Latency", "Total GPU Compute Time")


def test_partial_paste() -> None:
    s = load_trtexec(FIXTURES / "agx_orin_partial.txt")
    assert s.throughput_qps == 12.9581
    assert s.latency is not None and (s.latency.min, s.latency.mean) == (75.9753, 76.3344)
    assert s.gpu_compute is None and s.host_walltime_s is None
    assert "GPU Compute Time" in s.missing and "Latency" not in s.missing


def test_log_cut_mid_line_and_repeated_runs() -> None:
    """A line cut before its statistics is missing, not wrong; with two summaries in one
    log (two runs appended) the last one counts."""
    text = (FIXTURES / "xavier_trt8.4.txt").read_text()
    cut = text[: text.index("GPU Compute Time: min = 0.375977 ms,") + 31]
    s = parse_trtexec(cut)
    assert s.gpu_compute is None and s.d2h is None and s.h2d is not None
    assert s.missing == ("GPU Compute Time", "D2H Latency", "Total Host Walltime",
                         "Total GPU Compute Time")
    both = (FIXTURES / "desktop_percentiles.txt").read_text() + text
    assert parse_trtexec(both).throughput_qps == 41087.7


def test_no_summary_is_one_line(tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    log.write_text("[I] [TRT] Loaded engine size: 12 MiB\n[I] Starting inference\n")
    with pytest.raises(SfcError, match=r"no trtexec performance summary in .*build\.log"):
        load_trtexec(log)
    with pytest.raises(SfcError, match="trtexec log not found"):
        load_trtexec(tmp_path / "absent.log")


def test_json_round_trip_and_table() -> None:
    s = load_trtexec(FIXTURES / "desktop_percentiles.txt")
    assert TrtexecSummary.from_dict(s.to_dict()) == s
    with pytest.raises(SfcError, match="unknown trtexec summary type 'BenchReport'"):
        TrtexecSummary.from_dict({"_type": "BenchReport", "_version": 1, "_data": {}})
    table = render_trtexec(s)
    assert table.row_count == 2  # Latency and GPU Compute Time
    assert [c.header for c in table.columns][-3:] == ["p90", "p95", "p99"]
