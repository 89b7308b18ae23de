"""An ONNX speech model sfc did not export: Silero VAD (PyPI `silero-vad`, MIT) builds,
runs, and gets its output distortion reported."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from sfc.build import BuildConfig
from sfc.eval import read_manifest
from sfc.pipeline import compile_model
from sfc.runtime.audio import load_audio
from sfc.runtime.session import open_session
from sfc.runtime.vad import CHUNK, CONTEXT
from tests.conftest import REPO


def _feeds(split: str, folder: Path, n: int) -> Path:
    """One .npz per utterance: a 16 kHz chunk from its middle with the 64 samples of
    context before it (576 samples: on 512 alone the graph scores all as silence), a fresh
    state."""
    folder.mkdir(parents=True)
    for i, utt in enumerate(read_manifest(REPO / "calibration_data" / split)[:n]):
        audio = load_audio(utt.audio)
        mid = len(audio) // 2
        np.savez(folder / f"{i:03d}.npz", input=audio[None, mid - CONTEXT : mid + CHUNK],
                 state=np.zeros((2, 1, 128), np.float32), sr=np.array(16000, np.int64))
    return folder


def test_silero_vad_builds_runs_and_reports_distortion(tmp_path: Path) -> None:
    pytest.importorskip("silero_vad", reason="dev extra silero-vad not installed")
    src = Path(str(resources.files("silero_vad") / "data" / "silero_vad_16k_op15.onnx"))
    calib = _feeds("calib", tmp_path / "calib", 40)
    evals = _feeds("eval", tmp_path / "eval", 40)
    report = compile_model(str(src), tmp_path / "out", BuildConfig(calib=calib, calibrator="mse"),
                           eval_data=evals)
    d = report.distortion
    assert d is not None and d.feeds == 40
    print(f"\nsilero-vad W8A8 mse: rel L2 {d.rel_l2}, cosine {d.cosine}; "
          f"{report.fp32_bytes} -> {report.artifact_bytes} bytes; "
          f"fused {report.graphs[0]['lowering']['fused']}, "
          f"float {report.graphs[0]['lowering']['float_weighted']}")
    # The artifact is an ordinary ORT model; on speech it decides as FP32 does on most
    # chunks (W8A8 is not exact here: relative L2 0.3-0.4, BENCHMARKS.md).
    built = open_session(tmp_path / "out" / "model" / "model.ort.onnx")
    fp32 = open_session(src)
    probs = []
    for path in sorted(evals.glob("*.npz")):
        with np.load(path) as feed:
            inputs = {k: feed[k] for k in ("input", "state", "sr")}
        probs.append([float(s.run(None, inputs)[0].squeeze()) for s in (fp32, built)])
    p = np.asarray(probs)
    assert ((p >= 0) & (p <= 1)).all()
    # Speech, not the silent regime of 512-sample feeds (every score below 0.01 there).
    assert p[:, 0].max() > 0.5 and p[:, 0].mean() > 0.05
    assert ((p[:, 0] > 0.5) == (p[:, 1] > 0.5)).mean() >= 0.85
