"""benchmarks/short_window.py: window arguments, the cut features, the decoder's dynamic
cross length in ONNX Runtime, the any-frames encoder against HF's at 30 s, and the table."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from sfc.errors import SfcError
from sfc.runtime.features import LogMelSpec, whisper_windows
from tests.conftest import bench_module

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


@pytest.fixture(scope="module")
def sw() -> Any:
    """The script as a module (it imports its sibling `common` by name)."""
    return bench_module("short_window")


def test_parse_windows_keeps_order_and_drops_repeats(sw: Any) -> None:
    assert sw.parse_windows("15, 8,15,10") == (15, 8, 10)


@pytest.mark.parametrize("text", ["", "8,x", "8,0", "-5"])
def test_parse_windows_refuses_bad_lists(sw: Any, text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        sw.parse_windows(text)


def test_with_baseline_puts_the_baseline_first_then_longest(sw: Any) -> None:
    assert sw.with_baseline((8, 15, 10), 30) == (30, 15, 10, 8)
    assert sw.with_baseline((10, 30), 30) == (30, 10)


def test_with_baseline_refuses_windows_past_the_model(sw: Any) -> None:
    with pytest.raises(SfcError, match="exceed"):
        sw.with_baseline((40, 10), 30)


def test_window_frames_follow_the_hop(sw: Any) -> None:
    assert sw.window_frames(30, LogMelSpec()) == LogMelSpec().n_frames
    assert sw.window_frames(8, LogMelSpec(hop_length=320)) == 400


def _tone(seconds: float, spec: LogMelSpec) -> np.ndarray:
    t = np.arange(int(seconds * spec.sample_rate)) / spec.sample_rate
    return (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def test_short_windows_is_the_start_of_the_30s_window(sw: Any) -> None:
    spec = LogMelSpec()
    audio = _tone(2.5, spec)
    cut = sw.short_windows(audio, spec, 800)
    full = whisper_windows(audio, spec)
    assert cut.shape == (1, spec.n_mels, 800)
    assert cut.flags.c_contiguous
    np.testing.assert_array_equal(cut, full[:, :, :800])
    content = len(audio) // spec.hop_length
    assert np.all(cut[..., content:] == 0.0)  # past the clip: only the window's padding
    assert np.any(cut[..., :content] != 0.0)


def test_short_windows_takes_a_clip_that_just_fits_and_refuses_a_longer_one(sw: Any) -> None:
    spec = LogMelSpec()
    assert sw.short_windows(_tone(8.0, spec), spec, 800).shape == (1, spec.n_mels, 800)
    with pytest.raises(SfcError, match="does not fit"):
        sw.short_windows(_tone(8.02, spec), spec, 800)


def test_rotated_wraps(sw: Any) -> None:
    assert sw.rotated([30, 15, 10], 0) == [30, 15, 10]
    assert sw.rotated([30, 15, 10], 4) == [15, 10, 30]


def _cross_model() -> onnx.ModelProto:
    """A stand-in decoder: cross K/V [L, B, H, 1500, D] summed over positions."""
    shape: list[int | str] = [2, "batch", 3, 1500, 4]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
              for n in ("cross_key", "cross_value")]
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, "batch", 3, 1, 4])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [3])
    nodes = [helper.make_node("Add", ["cross_key", "cross_value"], ["s"]),
             helper.make_node("ReduceSum", ["s", "axes"], ["out"])]
    graph = helper.make_graph(nodes, "cross", inputs, [out], initializer=[axes])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, positions: int) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    x = np.ones((2, 1, 3, positions, 4), np.float32)
    return session.run(None, {"cross_key": x, "cross_value": x})[0]


def test_cross_positions_dynamic_lets_ort_take_a_shorter_encoder(sw: Any) -> None:
    model = _cross_model()
    with pytest.raises(Exception, match="Expected: 1500"):
        _run(model, 400)  # the export's fixed 1500 positions
    patched = sw.cross_positions_dynamic(model)
    onnx.checker.check_model(patched)
    np.testing.assert_array_equal(_run(patched, 400), np.full((2, 1, 3, 1, 4), 800.0))


def test_dynamic_encoder_matches_hf_at_30s_and_runs_shorter(sw: Any, tiny_hf: Any) -> None:
    import torch

    from sfc.models.whisper_export import _modules

    torch.manual_seed(0)
    feats = torch.randn(1, tiny_hf.model.config.num_mel_bins, 3000)
    with torch.no_grad():
        ours = sw.dynamic_encoder(tiny_hf)(feats)
        theirs = _modules(tiny_hf)[0](feats)  # HF's own encoder inside the export's wrapper
        short = sw.dynamic_encoder(tiny_hf)(feats[:, :, :800])
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert short[0].shape[1] == 400 and short[1].shape[3] == 400


def test_table_rows_mark_a_window_that_loses(sw: Any) -> None:
    def variant(delta: dict[str, float] | None, loses: bool, median: float) -> dict[str, Any]:
        return {"frames": 1, "eval": {"wer": 0.1, "ci_lo": 0.05, "ci_hi": 0.15,
                                      "loop_stops": 2, "rtf": 0.2},
                "paired_vs_baseline": delta, "loses": loses, "encoder_median_s": median,
                "encoder_speedup": 0.5 / median}

    result = {"windows": [30, 8], "variants": {
        "30": variant(None, False, 0.5),
        "8": variant({"delta": 0.02, "lo": 0.01, "hi": 0.03}, True, 0.125)}}
    base, short = sw.table_rows(result)
    assert base[3] == "-" and base[4] == "no"
    assert short[3] == "+2.00 [+1.00, +3.00]" and short[4] == "yes"
    assert short[7] == "4.00x"
