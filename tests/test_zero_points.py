"""Zero-point block weights: the carried integers, the writer's split, GPTQ, fake quantization
and ONNX Runtime running them (DQ and the fused MatMulNBits)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_quant_graphs import feeds_for, mlp_model, run, session

from sfc.errors import SfcError
from sfc.precision.budget import storage_bits
from sfc.quant import ORT_CPU_CAPS, PlanConfig, make_plan, model_sha256, recipe_from_plan
from sfc.quant.gptq import gptq_quantize
from sfc.quant.qdq import write_qdq
from sfc.quant.spec import QuantSpec
from sfc.quant.stored import StoredWeights
from sfc.quant.weights import (
    check_integers,
    dequantize_weight,
    integer_bounds,
    round_to_nearest,
    split_zero_points,
)

SYM4 = QuantSpec(4, "block", axis=0, block_size=32)
ZP4 = QuantSpec(4, "block", axis=0, block_size=32, zero_point=True)
ZP2 = QuantSpec(2, "block", axis=0, block_size=32, zero_point=True)


def _skewed(seed: int = 0, shape: tuple[int, int] = (128, 48)) -> np.ndarray:
    """Weights whose blocks are off-centre, as Whisper's often are."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape) * 0.05
    w += rng.uniform(-0.08, 0.08, (shape[0] // 32, 1, shape[1])).repeat(32, 0).reshape(shape)
    return w.astype(np.float32)


def _rel(w: np.ndarray, spec: QuantSpec, method: str = "mse") -> float:
    q, s = round_to_nearest(w, spec, method)
    return float(np.sum((dequantize_weight(q, spec, s) - w) ** 2) / np.sum(w**2))


def test_zero_points_cut_the_rounding_error_of_off_centre_blocks() -> None:
    w = _skewed()
    for method in ("absmax", "mse"):
        assert _rel(w, ZP4, method) < 0.7 * _rel(w, SYM4, method), method
    q, s = round_to_nearest(w, ZP4)
    assert check_integers(q, ZP4) is None
    lo, hi = integer_bounds(w, ZP4, s)
    assert ((lo <= 0) & (hi >= 0) & (hi - lo == 15)).all()  # each window holds 0
    assert q.min() < -8 or q.max() > 7  # carried integers use the wider range


def test_constant_and_one_sided_blocks_quantize_well() -> None:
    w = np.zeros((64, 4), np.float32)
    w[:32, 0] = 0.3  # constant
    w[:32, 1] = np.linspace(1.0, 1.1, 32)  # all positive, far from 0
    w[32:, 2] = -np.linspace(0.5, 0.6, 32)  # all negative
    q, s = round_to_nearest(w, ZP4)
    deq = dequantize_weight(q, ZP4, s)
    assert np.allclose(deq[:32, 0], 0.3, rtol=1e-6) and not deq[:, 3].any()
    assert np.abs(deq - w).max() <= 0.6 * s.max()  # nothing clipped beyond half a step


def test_split_zero_points_round_trips_and_rejects_wide_blocks() -> None:
    w = _skewed(1)
    for spec in (ZP4, ZP2):
        d, _ = round_to_nearest(w, spec)
        q, z = split_zero_points(d, spec)
        assert z.shape == (w.shape[0] // 32, w.shape[1])
        assert q.min() >= spec.qmin and q.max() <= spec.qmax
        assert z.min() >= spec.qmin and z.max() <= spec.qmax
        assert np.array_equal(q.astype(int) - np.repeat(z, 32, 0), d)
    d = np.zeros((32, 2), np.int8)
    d[0, 0], d[1, 0] = -8, 8  # 16 apart: no 4-bit zero point fits
    assert "more than 15 apart" in (check_integers(d, ZP4) or "")
    with pytest.raises(SfcError, match="more than 15 apart"):
        split_zero_points(d, ZP4)
    with pytest.raises(SfcError, match="more than 15 apart"):
        StoredWeights({"w": (d, np.ones((1, 2), np.float32))}).get("w", ZP4, (32, 2))


def test_gptq_with_zero_points_beats_rtn_and_symmetric_gptq() -> None:
    rng = np.random.default_rng(2)
    k, n = 128, 48
    # Correlated inputs with uneven scales: a realistic Gram matrix.
    x = rng.standard_normal((2048, k)) @ (np.eye(k) + 0.3 * rng.standard_normal((k, k)) / k**0.5)
    x *= rng.uniform(0.2, 3.0, k)
    w = _skewed(3, (k, n))
    gram = x.T @ x

    def out_err(q: np.ndarray, s: np.ndarray, spec: QuantSpec) -> float:
        return float(np.sum((x @ (dequantize_weight(q, spec, s) - w)) ** 2))

    q_zp, s_zp = gptq_quantize(w, gram, x.shape[0], ZP4)
    assert check_integers(q_zp, ZP4) is None
    assert out_err(q_zp, s_zp, ZP4) < out_err(*round_to_nearest(w, ZP4), ZP4)
    assert out_err(q_zp, s_zp, ZP4) < out_err(*gptq_quantize(w, gram, x.shape[0], SYM4), SYM4)


def test_fake_quantization_matches_the_writer_with_zero_points() -> None:
    torch = pytest.importorskip("torch")
    from sfc.precision.fakequant import fake_quantize

    for k in (96, 80):  # whole blocks, and a padded last block
        w = _skewed(4, (96, 40))[:k]
        q, s = round_to_nearest(w, ZP4)
        got = fake_quantize(torch.tensor(w), torch.tensor(s), ZP4).numpy()
        assert np.array_equal(got, dequantize_weight(q, ZP4, s))
    with pytest.raises(SfcError, match="2-D block"):
        spec = QuantSpec(4, "block", axis=1, block_size=32, zero_point=True)
        fake_quantize(torch.zeros(4, 64), torch.ones(4, 2), spec)


def test_storage_counts_one_zero_point_per_block() -> None:
    assert storage_bits((64, 10), ZP4) == 64 * 10 * 4 + 2 * 10 * (32 + 4)
    assert storage_bits((64, 10), SYM4) == 64 * 10 * 4 + 2 * 10 * 32


def _mlp_qdq(bits: int) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    model = mlp_model()
    config = PlanConfig(weight_bits=bits, activation_bits=None)
    plan = make_plan(model, config, ORT_CPU_CAPS)
    recipe = recipe_from_plan(plan, {}, model_sha256(model), 0, config.to_dict())
    return model, write_qdq(model, recipe)


@pytest.mark.parametrize("bits", [4, 2])
def test_ort_runs_zero_point_blocks_as_written_and_fuses_them(bits: int, tmp_path) -> None:
    model, qdq = _mlp_qdq(bits)
    onnx.checker.check_model(qdq, full_check=True)
    inits = {t.name: t for t in qdq.graph.initializer}
    dqs = [n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and len(n.input) == 3]
    assert dqs, "no zero-point DQ written"
    weight_type = {4: TensorProto.INT4, 2: TensorProto.INT2}[bits]
    for dq in dqs:
        assert inits[dq.input[2]].data_type == inits[dq.input[0]].data_type == weight_type
    # The DQ alone (no fusion: basic level) computes (q - z) * s = the carried d * s.
    feeds = feeds_for(model)
    spec = QuantSpec(bits, "block", axis=0, block_size=32, zero_point=True)
    for dq in dqs:
        probe = helper.make_graph(
            [helper.make_node("DequantizeLinear", list(dq.input), ["w"], axis=0, block_size=32)],
            "probe", [], [helper.make_tensor_value_info("w", TensorProto.FLOAT, None)],
            initializer=[inits[i] for i in dq.input])
        m = helper.make_model(probe, opset_imports=list(qdq.opset_import))
        m.ir_version = qdq.ir_version
        (w_dq,) = run(m, {})
        source = next(t for t in model.graph.initializer if dq.output[0].startswith(t.name))
        d, s = round_to_nearest(numpy_helper.to_array(source), spec)
        assert np.array_equal(w_dq, dequantize_weight(d, spec, s))
    # ORT's extended optimisation fuses every such DQ -> MatMul into MatMulNBits.
    path = tmp_path / "optimized.onnx"
    session(qdq, str(path))
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("MatMulNBits") == len(dqs) and "DequantizeLinear" not in ops
    # ...and the fused kernels compute what the DQ says (up to MatMulNBits quantizing its
    # activations to INT8 at accuracy_level 4).
    (got,) = run(qdq, feeds)
    (plain,) = session(qdq, optimize=False).run(None, feeds)
    assert np.linalg.norm(got - plain) / np.linalg.norm(plain) < 0.02
