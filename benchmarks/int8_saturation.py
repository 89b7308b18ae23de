"""INT8 weight schemes against ONNX Runtime's fused CPU kernels on this machine.

Run from the repository root::

    python benchmarks/int8_saturation.py

For the small test models of ``tests/test_quant_graphs.py`` (W8A8, absmax activation
scales, seed 0) and each way of storing the INT8 weights, prints the relative L2 error of
the output against FP32 for the QDQ graph run exactly (no ORT optimisation) and through
ORT's fused integer kernels, and the largest difference between the two. On an x86 CPU
without VNNI the full-range weights make the kernels disagree with the graph (the u8 x s8
kernel adds K-adjacent products in a saturating int16); on a VNNI or ARM CPU every row
shows a difference near 0.

Weight schemes: full range (``ort-cpu:vnni``); 7-bit (ONNX Runtime's ``reduce_range``,
emulated by re-quantizing each weight at |w|max / 63); the full-range integers with the
pairs (2k, 2k+1) limited to |a| + |b| <= 128, and with the pairs (2k+1, 2k+2) limited
instead (which pairs the kernel adds); and ``ort-cpu:avx2`` (scales that leave room for
the pairs).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from common import machine_info, machine_line, print_table
from onnx import TensorProto, numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_quant_graphs import (  # noqa: E402 (the test models live with the tests)
    absmax_scales,
    feeds_for,
    mlp_model,
    rel_l2,
    speech_model,
    versioned_ops_model,
)

from sfc.quant import (  # noqa: E402
    ORT_CPU_CAPS,
    ORT_CPU_SATURATING_CAPS,
    PlanConfig,
    TargetCaps,
    make_plan,
    model_sha256,
    recipe_from_plan,
    write_qdq,
)
from sfc.quant.weights import limit_pairs  # noqa: E402

Rewrite = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def _qdq(model: onnx.ModelProto, caps: TargetCaps) -> onnx.ModelProto:
    plan = make_plan(model, PlanConfig(), caps)
    scales = absmax_scales(model, feeds_for(model), [q.tensor for q in plan.activations])
    recipe = recipe_from_plan(plan, scales, model_sha256(model), 0, PlanConfig().to_dict())
    return write_qdq(model, recipe)


def _rewrite_weights(qdq: onnx.ModelProto, rewrite: Rewrite) -> onnx.ModelProto:
    """A copy of `qdq` whose per-channel INT8 weights (and scales) `rewrite` replaced."""
    out = onnx.ModelProto()
    out.CopyFrom(qdq)
    inits = {t.name: t for t in out.graph.initializer}
    for node in out.graph.node:
        q = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if q is None or q.data_type != TensorProto.INT8 or len(q.dims) != 2:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        ints, scale = rewrite(numpy_helper.to_array(q), numpy_helper.to_array(
            inits[node.input[1]]), axis)
        q.CopyFrom(numpy_helper.from_array(ints.astype(np.int8), q.name))
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(
            scale.astype(np.float32), node.input[1]))
    return out


def _seven_bit(q: np.ndarray, scale: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    shape = [1, 1]
    shape[axis] = -1
    w = q * scale.reshape(shape)
    new = np.abs(w).max(axis=1 - axis) / 63
    return np.clip(np.rint(w / new.reshape(shape)), -64, 63), new


def _pairs_from(offset: int) -> Rewrite:
    def rewrite(q: np.ndarray, scale: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
        k_first = np.moveaxis(q, 1 - axis, 0).copy()  # [K, channels]
        k_first[offset:] = limit_pairs(k_first[offset:], 1, 128)
        return np.moveaxis(k_first, 0, 1 - axis), scale
    return rewrite


def _session(model: onnx.ModelProto, level: ort.GraphOptimizationLevel) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def main() -> int:
    machine = machine_info(threads=0)
    exact_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    fused_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    rows = []
    for build in (speech_model, mlp_model, versioned_ops_model):
        model = build()
        feeds = feeds_for(model)
        ref = _session(model, exact_level).run(None, feeds)[0]
        full = _qdq(model, ORT_CPU_CAPS)
        schemes = {
            "full range (ort-cpu:vnni)": full,
            "7-bit (reduce_range)": _rewrite_weights(full, _seven_bit),
            "full, pairs (2k, 2k+1) <= 128": _rewrite_weights(full, _pairs_from(0)),
            "full, pairs (2k+1, 2k+2) <= 128": _rewrite_weights(full, _pairs_from(1)),
            "ort-cpu:avx2 (pair-room scales)": _qdq(model, ORT_CPU_SATURATING_CAPS),
        }
        for name, qdq in schemes.items():
            exact = _session(qdq, exact_level).run(None, feeds)[0]
            fused = _session(qdq, fused_level).run(None, feeds)[0]
            rows.append([build.__name__, name, f"{rel_l2(exact, ref):.4f}",
                         f"{rel_l2(fused, ref):.4f}", f"{np.abs(fused - exact).max():.2g}"])
    print_table("INT8 weights vs ONNX Runtime's fused CPU kernels",
                ["model", "weights", "exact QDQ rel. err", "fused rel. err", "max |fused - exact|"],
                rows, machine_line(machine) + " (threads=0: ORT's default)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
