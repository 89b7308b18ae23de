"""benchmarks/scale_codes.py: block scales moved onto each output column's coded grid."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import bench_module

codes = bench_module("scale_codes")


def test_codes_keep_each_rows_largest_scale_and_lie_on_its_grid() -> None:
    rng = np.random.default_rng(0)
    scales = (rng.random(6 * 12) * 0.1 + 1e-4).astype(np.float32)  # 6 rows of 12 blocks
    coded = codes.code_scales(scales, 6, 8).reshape(6, 12)
    rows = scales.reshape(6, 12)
    top = rows.max(axis=1, keepdims=True)
    assert np.allclose(coded.max(axis=1, keepdims=True), top, rtol=1e-6)
    steps = coded / top * 255
    assert np.allclose(steps, np.rint(steps), atol=1e-3) and (coded > 0).all()
    assert np.abs(coded - rows).max() <= 0.5 * top.max() / 255 * (1 + 1e-5)
    coarse = codes.code_scales(scales, 6, 4).reshape(6, 12)
    assert np.abs(coarse - rows).sum() > np.abs(coded - rows).sum()  # fewer bits, worse


def test_recode_rewrites_nbits_scales_behind_their_cast() -> None:
    half = numpy_helper.from_array(np.array([0.5, 0.01, 0.25, 0.25], np.float16), "s_f16")
    nodes = [helper.make_node("Cast", ["s_f16"], ["s"], to=TensorProto.FLOAT),
             helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft",
                              K=64, N=2, bits=4, block_size=32)]
    model = helper.make_model(helper.make_graph(nodes, "g", [], [], [half]))
    count, worst = codes.recode(model, 4)
    (stored,) = model.graph.initializer
    got = numpy_helper.to_array(stored)
    assert count == 1 and stored.data_type == TensorProto.FLOAT16
    assert got[0] == 0.5 and got[2] == got[3] == 0.25  # each row's top is kept
    assert abs(float(got[1]) - 0.5 / 15) < 1e-3 and worst > 1.0  # 0.01 -> one step of 15
