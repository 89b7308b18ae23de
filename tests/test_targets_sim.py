"""The `sim` target: 4-bit activations and W4A8 run as exact fake quantization in ORT."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from test_quant_graphs import feeds_for, mlp_model, run, tensor_values

from sfc.errors import SfcError
from sfc.quant import (
    ORT_CPU_CAPS,
    SIM_CAPS,
    PlanConfig,
    make_plan,
    model_sha256,
    recipe_from_plan,
    write_qdq,
)
from sfc.runtime.session import open_session
from sfc.targets import SimTarget, get_target


def _qdq(weight_bits: int, activation_bits: int) -> tuple[onnx.ModelProto, onnx.ModelProto,
                                                            dict[str, float]]:
    model = mlp_model()
    config = PlanConfig(weight_bits=weight_bits, activation_bits=activation_bits, block_size=16)
    plan = make_plan(model, config, SIM_CAPS)
    qmax = 2 ** (activation_bits - 1) - 1
    values = tensor_values(model, feeds_for(model), [q.tensor for q in plan.activations])
    # Half of absmax: the 4-bit range clips, so the reference must saturate like Q does.
    scales = {n: float(np.abs(v).max()) / 2 / qmax for n, v in values.items()}
    recipe = recipe_from_plan(
        plan, {n: (s, "test", {"absmax": 2 * s * qmax}) for n, s in scales.items()},
        model_sha256(model), 0, config.to_dict())
    return model, write_qdq(model, recipe), scales


def _dequantized_weight(qdq: onnx.ModelProto, matmul: str) -> np.ndarray:
    """The weight a MatMul reads after its DQ, computed from the stored integers and scales."""
    nodes = {o: n for n in qdq.graph.node for o in n.output}
    inits = {i.name: i for i in qdq.graph.initializer}
    mm = next(n for n in qdq.graph.node if n.name == matmul)
    dq = nodes[mm.input[1]]
    q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float32)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
    block = next(a.i for a in dq.attribute if a.name == "block_size")
    if len(dq.input) > 2:  # sim runs block zero points
        zero = numpy_helper.to_array(inits[dq.input[2]]).astype(np.float32)
        q = q - np.repeat(zero, block, axis=0)[: q.shape[0]]
    return q * np.repeat(scale, block, axis=0)[: q.shape[0]]


def _fake_quant(x: np.ndarray, scale: float, bits: int) -> np.ndarray:
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    s = np.float32(scale)
    return (np.clip(np.rint(x / s), lo, hi) * s).astype(np.float32)


def test_w4a4_runs_as_exact_fake_quantization(tmp_path: Path) -> None:
    model, qdq, scales = _qdq(4, 4)
    onnx.checker.check_model(qdq, full_check=True)
    act_q = [n for n in qdq.graph.node if n.op_type == "QuantizeLinear"]
    assert len(act_q) == 2
    inits = {i.name: i for i in qdq.graph.initializer}
    # The zero point's type is what makes Q produce 4-bit integers.
    assert {inits[n.input[2]].data_type for n in act_q} == {TensorProto.INT4}
    # Both MatMuls read a dequantized activation and a dequantized block weight.
    producers = {o: n.op_type for n in qdq.graph.node for o in n.output}
    for mm in (n for n in qdq.graph.node if n.op_type == "MatMul"):
        assert [producers.get(i) for i in mm.input] == ["DequantizeLinear"] * 2

    feeds = feeds_for(model)
    inits_f = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    (x_name, r_name) = sorted(scales, key=lambda n: n != "x")
    h = _fake_quant(feeds["x"], scales[x_name], 4) @ _dequantized_weight(qdq, "mm1")
    r = np.maximum(h + inits_f["b1"], 0)
    expected = _fake_quant(r, scales[r_name], 4) @ _dequantized_weight(qdq, "mm2")
    # Opened the way a sim build's card says ("basic"): ORT's extended level rewrites the
    # Relu -> INT4 Q pair of this graph and changes the result (onnxruntime 1.31).
    onnx.save(qdq, str(tmp_path / "model.qdq.onnx"))
    result = SimTarget().lower(tmp_path / "model.qdq.onnx", tmp_path)
    sess = open_session(tmp_path / result.artifact, optimization=result.optimization)
    (got,) = sess.run(None, feeds)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # ...and 4-bit activations at half absmax really clip: far from the float model.
    (ref,) = run(model, feeds)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) > 0.05


def test_sim_lowering_reports_the_qdq_file(tmp_path: Path) -> None:
    _, qdq, _ = _qdq(4, 8)
    onnx.save(qdq, str(tmp_path / "model.qdq.onnx"))
    result = SimTarget().lower(tmp_path / "model.qdq.onnx", tmp_path)
    assert result.artifact == "model.qdq.onnx" and result.target == "sim"
    assert result.fused == {} and result.dq_remaining == 4  # 2 activation + 2 weight DQs
    assert result.bytes == (tmp_path / "model.qdq.onnx").stat().st_size
    assert "fake-quant" in result.notes[0]
    elsewhere = SimTarget().lower(tmp_path / "model.qdq.onnx", tmp_path / "out", stem="enc")
    assert elsewhere.artifact == "enc.qdq.onnx" and (tmp_path / "out" / "enc.qdq.onnx").is_file()
    assert get_target("sim").name == "sim"


def test_sim_rejects_a_file_ort_cannot_load(tmp_path: Path) -> None:
    bad = tmp_path / "model.qdq.onnx"
    bad.write_bytes(b"not a protobuf at all")
    with pytest.raises(SfcError, match=r"not an ONNX model|cannot load"):
        SimTarget().lower(bad, tmp_path)


def test_ort_cpu_refuses_4bit_activations_and_points_to_sim() -> None:
    with pytest.raises(SfcError, match=r"4-bit activations.*--target sim"):
        make_plan(mlp_model(), PlanConfig(activation_bits=4), ORT_CPU_CAPS)
    with pytest.raises(SfcError, match="activation_bits must be 8, 4 or None"):
        PlanConfig(activation_bits=2)


def test_int4_storage_is_what_ml_dtypes_reads() -> None:
    # The reference above reads INT4 initializers through numpy_helper; make sure that
    # decodes signed nibbles (a sign bug would pass the fake-quant comparison vacuously).
    t = numpy_helper.from_array(np.array([-8, -1, 0, 7], dtype=ml_dtypes.int4), "t")
    assert numpy_helper.to_array(t).astype(np.int8).tolist() == [-8, -1, 0, 7]
