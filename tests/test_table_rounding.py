"""benchmarks/table_rounding.py: the variant tables and the copy whose logits MatMul alone
reads another table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from tests.conftest import bench_module
from tests.test_precision import _tied


@pytest.fixture(scope="module")
def tr() -> Any:
    return bench_module("table_rounding")


def _build(tmp_path: Path) -> Path:
    """A build folder layout around the tied test model (card -> decoder path)."""
    src, _ = _tied(tmp_path / "tied.onnx", tmp_path / "feeds")
    build = tmp_path / "build"
    (build / "decoder").mkdir(parents=True)
    shutil.copy(src, build / "decoder" / "model.ort.onnx")
    (build / "card.json").write_text(json.dumps(
        {"_data": {"graphs": {"decoder": {"path": "decoder/model.ort.onnx"}}}}))
    return build


def test_only_the_logits_matmul_reads_the_variant_table(tr: Any, tmp_path: Path) -> None:
    build = _build(tmp_path)
    model = onnx.load(str(build / "decoder" / "model.ort.onnx"))
    assert tr._logits_table(model) == "E"
    table = np.zeros((64, 64), np.float32)
    tr.write_variant(build, tmp_path / "v", table)
    out = onnx.load(str(tmp_path / "v" / "decoder" / "model.ort.onnx"))
    readers = {n.name: list(n.input) for n in out.graph.node}
    assert readers["embed"][0] == "E" and readers["logits"][1] == "E_logits"
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((3, 64)).astype(np.float32),
             "tokens": np.array([0, 5, 9])}
    sess = ort.InferenceSession(str(tmp_path / "v" / "decoder" / "model.ort.onnx"))
    assert not sess.run(None, feeds)[0].any()  # the zero table reached the logits only
    e = next(numpy_helper.to_array(t) for t in out.graph.initializer if t.name == "E")
    assert e.any()  # the Gather's table is untouched


def test_frequent_token_variant_keeps_low_ids_and_specials_int8(tr: Any) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, tr.EOT + 8)).astype(np.float32)
    mse, int8 = tr._fake(w, tr.BLOCK), tr._fake(w, tr.CHANNEL)
    mixed = tr.frequent_int8(mse, int8, 100)
    assert (mixed[:, :100] == int8[:, :100]).all() and (mixed[:, tr.EOT:] == int8[:, tr.EOT:]).all()
    assert (mixed[:, 100:tr.EOT] == mse[:, 100:tr.EOT]).all()
    assert not np.array_equal(mse, int8)
