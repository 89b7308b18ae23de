"""Silero VAD's 16 kHz ONNX graph cut in two, so that a recording is scored in two ORT calls
per block of chunks instead of one call per 32 ms chunk.

The package's graph maps one chunk (512 samples after the previous chunk's last 64) and
the recurrent state to a speech probability: an STFT and four convolutions per chunk
(the encoder, independent of every other chunk), then one LSTM cell step, ReLU, a 1x1
convolution and a sigmoid. Called once per chunk, the per-call cost of ORT was half of
the time (451 s of audio: 1.53 s in 14100 calls). Here the encoder is the package's own
nodes, extracted (run on a block of chunks at once), and the recurrent part is one ONNX
`LSTM` over the whole sequence with the package's weights, its gates reordered as the
package's export reorders them (PyTorch i, f, g, o to ONNX i, o, f, c). The probabilities
differ from the per-chunk graph's by float rounding (2.4e-7 at most on that recording).
faster-whisper (1.2.1) does the same with a graph of its own that takes a block of chunks
and the LSTM state (`silero_vad_v6.onnx`, `SileroVADModel`); the silero-vad package ships
only the per-chunk graph, hence the cut here.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh
from onnx.utils import Extractor

from ..errors import SfcError

__all__ = ["HIDDEN", "split_silero"]

HIDDEN = 128  # the LSTM's width, and the encoder's output channels
_ENCODED = "/model/encoder/3/activation/Relu_output_0"  # the last convolution's ReLU
_RNN = "model.decoder.rnn."
_HEAD = "model.decoder.decoder.2."  # the 1x1 convolution to one logit


def _onnx_gates(rows: np.ndarray) -> np.ndarray:
    """PyTorch's LSTM gate blocks (input, forget, cell, output) in ONNX's order (input,
    output, forget, cell): the slices the package's own export concatenates."""
    h = HIDDEN
    return np.concatenate([rows[:h], rows[3 * h:4 * h], rows[h:3 * h]])


def split_silero(model: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(encoder, recurrent) graphs of Silero VAD's 16 kHz graph.

    encoder: input [chunks, 576] -> encoded [chunks, 128, 1]. recurrent: x [chunks, 1,
    128] (the encoded chunks in order), h0, c0 [1, 1, 128] -> p [chunks] (each chunk's
    speech probability), h, c (the state after the last chunk).
    """
    weights = {t.name: nh.to_array(t) for t in model.graph.initializer}
    names = [_RNN + k for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    if any(n not in weights for n in [*names, _HEAD + "weight", _HEAD + "bias"]):
        raise SfcError("not Silero VAD's 16 kHz graph (v5/v6 layout): its LSTM weights "
                       "are missing")
    try:
        encoder = Extractor(onnx.shape_inference.infer_shapes(model)).extract_model(
            ["input"], [_ENCODED])
    except ValueError as exc:
        raise SfcError(f"not Silero VAD's 16 kHz graph (v5/v6 layout): {exc}") from None
    w_ih, w_hh, b_ih, b_hh = (weights[n] for n in names)
    head = weights[_HEAD + "weight"].reshape(1, HIDDEN).T
    inits = [
        nh.from_array(_onnx_gates(w_ih)[None], "W"),
        nh.from_array(_onnx_gates(w_hh)[None], "R"),
        nh.from_array(np.concatenate([_onnx_gates(b_ih), _onnx_gates(b_hh)])[None], "B"),
        nh.from_array(np.ascontiguousarray(head), "head_w"),
        nh.from_array(weights[_HEAD + "bias"], "head_b"),
        nh.from_array(np.array([-1, HIDDEN], np.int64), "rows"),
        nh.from_array(np.array([-1], np.int64), "flat"),
    ]
    nodes = [
        oh.make_node("LSTM", ["x", "W", "R", "B", "", "h0", "c0"], ["y", "h", "c"],
                     hidden_size=HIDDEN),
        oh.make_node("Relu", ["y"], ["y_relu"]),
        oh.make_node("Reshape", ["y_relu", "rows"], ["y_rows"]),
        oh.make_node("MatMul", ["y_rows", "head_w"], ["logit_w"]),
        oh.make_node("Add", ["logit_w", "head_b"], ["logit"]),
        oh.make_node("Sigmoid", ["logit"], ["p_rows"]),
        oh.make_node("Reshape", ["p_rows", "flat"], ["p"]),
    ]
    state = [1, 1, HIDDEN]
    graph = oh.make_graph(
        nodes, "silero_recurrent",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["chunks", 1, HIDDEN]),
         oh.make_tensor_value_info("h0", TensorProto.FLOAT, state),
         oh.make_tensor_value_info("c0", TensorProto.FLOAT, state)],
        [oh.make_tensor_value_info("p", TensorProto.FLOAT, ["chunks"]),
         oh.make_tensor_value_info("h", TensorProto.FLOAT, state),
         oh.make_tensor_value_info("c", TensorProto.FLOAT, state)],
        inits)
    recurrent = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 15)],
                              ir_version=model.ir_version)
    onnx.checker.check_model(recurrent)
    return encoder, recurrent
