"""Shared fixtures: one FP32 export of whisper-tiny.en per test session."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
EVAL_DATA = REPO / "calibration_data" / "eval"


def stacked_decoder_graph() -> Any:
    """The decoder graph spec a fake Whisper runtime's card names: cross K/V stacked, as
    the fakes' decoders read them (`sfc.runtime.cross`)."""
    from sfc.card import GraphSpec, TensorSpec
    from sfc.runtime.cross import STACKED

    return GraphSpec("decoder.onnx", tuple(TensorSpec(n, "float32", ()) for n in STACKED), ())


def model_with_feeds(folder: Path, model: Any, shape: tuple[int, ...]) -> tuple[Path, Path]:
    """`model` saved as folder/model.onnx and six seeded `.npz` calibration feeds of its
    input `x` (float32 of `shape`) in folder/feeds: a generic model to build."""
    import numpy as np
    import onnx

    src = folder / "model.onnx"
    onnx.save(model, str(src))
    feeds = folder / "feeds"
    feeds.mkdir()
    rng = np.random.default_rng(2)
    for i in range(6):
        np.savez(feeds / f"{i:02d}.npz", x=rng.standard_normal(shape).astype(np.float32))
    return src, feeds


def bench_module(name: str) -> Any:
    """benchmarks/<name>.py as a module (the scripts import their sibling `common` by name,
    so their folder is on sys.path while it loads)."""
    folder = str(REPO / "benchmarks")
    sys.path.insert(0, folder)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(folder)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Zoo exports, probes and search checkpoints go to a temporary $SFC_CACHE: tests
    never read or write the user's ~/.cache/sfc."""
    os.environ["SFC_CACHE"] = str(tmp_path_factory.mktemp("sfc-cache"))


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """whisper-tiny.en exported by sfc (encoder.onnx, decoder.onnx, card.json)."""
    from sfc.models.whisper_export import export_whisper

    out = tmp_path_factory.mktemp("tiny")
    export_whisper("whisper-tiny.en", out)
    return out


@pytest.fixture(scope="session")
def tiny_runtime(tiny_export: Path):  # type: ignore[no-untyped-def]
    """The FP32 export through the runtime on one thread, as CLI tests run `--threads 1`:
    the Python API's transcripts, to compare the command's output with."""
    from sfc.runtime.whisper import WhisperRuntime

    return WhisperRuntime.open(tiny_export, threads=1)


@pytest.fixture(scope="session")
def shortest_clips() -> list[Path]:
    """The two shortest bundled eval clips (fast real-model tests)."""
    from sfc.eval.manifest import read_manifest

    utts = sorted(read_manifest(EVAL_DATA), key=lambda u: u.duration_s or float("inf"))
    return [Path(u.audio) for u in utts[:2]]


@pytest.fixture(scope="session")
def tiny_hf():  # type: ignore[no-untyped-def]
    """The converted PyTorch model (strict load)."""
    from sfc.models.whisper_hf import load_whisper
    from sfc.models.zoo import locate_checkpoint

    return load_whisper(locate_checkpoint("whisper-tiny.en"))
