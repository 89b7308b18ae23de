"""Small ONNX graphs for the quantization tests, built with onnx.helper.

Imported by the other test_quant_* modules; its own tests check that the float graphs
are valid and run in onnxruntime, so a failure elsewhere is never the fixture's fault.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

D, HIDDEN, C_IN, T, N_IDS = 64, 128, 16, 32, 8


def _init(rng: np.random.Generator, name: str, shape: tuple[int, ...], std: float = 0.1):
    return numpy_helper.from_array((rng.standard_normal(shape) * std).astype(np.float32), name)


def _model(
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    opset: int = 17,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8  # what torch's exporter writes for opset 17
    onnx.checker.check_model(model, full_check=True)
    return model


def mlp_model(seed: int = 0) -> onnx.ModelProto:
    """x -> MatMul(W1) -> Add(b1) -> Relu -> MatMul(W2) -> y."""
    rng = np.random.default_rng(seed)
    inits = [
        _init(rng, "W1", (D, HIDDEN)),
        _init(rng, "b1", (HIDDEN,)),
        _init(rng, "W2", (HIDDEN, D)),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", T, D])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", T, D])
    return _model(nodes, inits, [x], [y])


def speech_model(seed: int = 0) -> onnx.ModelProto:
    """A tiny encoder-like graph with every case placement must handle.

    Conv front end; LayerNorm feeding q/k/v MatMuls (one shared activation); attention
    MatMuls of two activations; Softmax; Gemm with transB=1; an fc1 -> Erf -> fc2 block
    whose input also feeds a float residual Add; a tied weight E read by a Gather
    (embedding) and by the output MatMul.
    """
    rng = np.random.default_rng(seed)
    inits = [
        _init(rng, "conv.w", (D, C_IN, 3), 0.2),
        _init(rng, "conv.b", (D,)),
        numpy_helper.from_array(np.ones(D, np.float32), "ln.g"),
        numpy_helper.from_array(np.zeros(D, np.float32), "ln.b"),
        _init(rng, "q.w", (D, D)),
        _init(rng, "k.w", (D, D)),
        _init(rng, "v.w", (D, D)),
        numpy_helper.from_array(np.array(D**-0.5, np.float32), "attn.scale"),
        _init(rng, "o.w", (D, D)),  # Gemm transB=1: [N, K]
        _init(rng, "o.b", (D,)),
        numpy_helper.from_array(np.array([T, D], np.int64), "shape2d"),
        numpy_helper.from_array(np.array([1, T, D], np.int64), "shape3d"),
        _init(rng, "fc1.w", (D, HIDDEN)),
        _init(rng, "fc2.w", (HIDDEN, D)),
        _init(rng, "E", (D, D), 0.3),  # tied: Gather rows, and MatMul B[K, N]
    ]
    node = helper.make_node
    nodes = [
        node("Conv", ["feats", "conv.w", "conv.b"], ["conv"], name="conv", pads=[1, 1]),
        node("Transpose", ["conv"], ["h0"], name="to_btd", perm=[0, 2, 1]),
        node("LayerNormalization", ["h0", "ln.g", "ln.b"], ["ln"], name="ln", axis=-1),
        node("MatMul", ["ln", "q.w"], ["q"], name="q_proj"),
        node("MatMul", ["ln", "k.w"], ["k"], name="k_proj"),
        node("MatMul", ["ln", "v.w"], ["v"], name="v_proj"),
        node("Transpose", ["k"], ["kt"], name="k_t", perm=[0, 2, 1]),
        node("MatMul", ["q", "kt"], ["scores"], name="attn_qk"),
        node("Mul", ["scores", "attn.scale"], ["scaled"], name="attn_scale"),
        node("Softmax", ["scaled"], ["probs"], name="softmax", axis=-1),
        node("MatMul", ["probs", "v"], ["ctx"], name="attn_av"),
        node("Reshape", ["ctx", "shape2d"], ["ctx2d"], name="flatten"),
        node("Gemm", ["ctx2d", "o.w", "o.b"], ["o2d"], name="out_proj", transB=1),
        node("Reshape", ["o2d", "shape3d"], ["o"], name="unflatten"),
        node("Add", ["h0", "o"], ["res"], name="residual1"),
        node("MatMul", ["res", "fc1.w"], ["f1"], name="fc1"),
        node("Erf", ["f1"], ["act"], name="act"),
        node("MatMul", ["act", "fc2.w"], ["f2"], name="fc2"),
        node("Add", ["res", "f2"], ["enc"], name="residual2"),
        node("MatMul", ["enc", "E"], ["logits"], name="lm_head"),
        node("Gather", ["E", "ids"], ["emb"], name="embed", axis=0),
    ]
    inputs = [
        helper.make_tensor_value_info("feats", TensorProto.FLOAT, [1, C_IN, T]),
        helper.make_tensor_value_info("ids", TensorProto.INT64, [1, N_IDS]),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, T, D]),
        helper.make_tensor_value_info("emb", TensorProto.FLOAT, [1, N_IDS, D]),
    ]
    return _model(nodes, inits, inputs, outputs)


def versioned_ops_model(seed: int = 0) -> onnx.ModelProto:
    """Opset-17 ops whose signatures change by opset 21/25 (ReduceMean axes attribute ->
    input at 18; Split) around LayerNormalization and two MatMuls."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(np.ones(D, np.float32), "ln.g"),
        numpy_helper.from_array(np.zeros(D, np.float32), "ln.b"),
        numpy_helper.from_array(np.array([D // 2, D // 2], np.int64), "halves"),
        _init(rng, "W1", (D // 2, D)),
        _init(rng, "W2", (D // 2, D)),
    ]
    node = helper.make_node
    nodes = [
        node("ReduceMean", ["x"], ["mean"], name="mean", axes=[-1], keepdims=1),
        node("Sub", ["x", "mean"], ["centred"], name="centre"),
        node("LayerNormalization", ["centred", "ln.g", "ln.b"], ["ln"], name="ln", axis=-1),
        node("Split", ["ln", "halves"], ["left", "right"], name="split", axis=-1),
        node("MatMul", ["left", "W1"], ["a"], name="mm_left"),
        node("MatMul", ["right", "W2"], ["b"], name="mm_right"),
        node("Add", ["a", "b"], ["y"], name="sum"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, T, D])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, T, D])
    return _model(nodes, inits, [x], [y])


def feeds_for(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    """Random inputs for the builders' graphs (dims named 'B' become 2)."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.input:
        dims = [d.dim_value or 2 for d in value.type.tensor_type.shape.dim]
        if value.type.tensor_type.elem_type == TensorProto.INT64:
            feeds[value.name] = rng.integers(0, D, size=dims).astype(np.int64)
        else:
            feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def session(
    model: onnx.ModelProto, optimized_path: str | None = None, *, optimize: bool = True
) -> ort.InferenceSession:
    """A CPU session; with `optimized_path`, extended graph optimisation saved there;
    `optimize=False`: no graph optimisation at all (the plain ONNX semantics)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    elif optimized_path is not None:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = optimized_path
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    return session(model).run(None, dict(feeds))


def tensor_values(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], names: Iterable[str]
) -> dict[str, np.ndarray]:
    """Intermediate tensors of the float model (exposed as extra outputs)."""
    names = list(names)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    graph_outputs = {o.name for o in probe.graph.output}
    for name in names:
        if name not in graph_outputs:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    out_names = [o.name for o in probe.graph.output]
    values = dict(zip(out_names, run(probe, feeds), strict=True))
    return {n: values[n] for n in names}


def absmax_scales(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], names: Iterable[str]
) -> dict[str, tuple[float, str, dict[str, float]]]:
    """Max calibration on one batch: scale = |x|max / 127 (the tests' stand-in for calib)."""
    out = {}
    for name, value in tensor_values(model, feeds, names).items():
        absmax = float(np.abs(value).max())
        out[name] = (absmax / 127.0, "max", {"absmax": absmax, "n_values": int(value.size)})
    return out


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_builders_are_valid_and_run() -> None:
    for build in (mlp_model, speech_model, versioned_ops_model):
        model = build()
        outputs = run(model, feeds_for(model))
        assert all(np.isfinite(o).all() for o in outputs)
        assert all(n.name for n in model.graph.node)
