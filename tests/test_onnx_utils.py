"""`sfc.onnx_utils.with_weights`: a model copy with some initializers replaced."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from sfc.errors import SfcError
from sfc.onnx_utils import with_weights
from tests.test_build import _mlp


def test_with_weights_replaces_only_the_named_initializers(tmp_path: Path) -> None:
    model = onnx.load(str(_mlp(tmp_path / "mlp.onnx")))
    w1 = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}["w1"]
    copy = with_weights(model, {"w1": np.zeros_like(w1, dtype=np.float64)})
    got = {t.name: numpy_helper.to_array(t) for t in copy.graph.initializer}
    assert got["w1"].dtype == np.float32 and not got["w1"].any()
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(got["w2"], original["w2"])
    np.testing.assert_array_equal(original["w1"], w1)  # the source model is untouched
    with pytest.raises(SfcError, match="not initializers of the graph: x"):
        with_weights(model, {"x": w1})
    with pytest.raises(SfcError, match="replacement shape"):
        with_weights(model, {"w1": w1.T})
    # Assembled field by field (so the old bytes are never held), it serializes as a whole
    # copy with the initializer overwritten would; metadata, opsets and docs included.
    model.doc_string = "doc"
    onnx.helper.set_model_props(model, {"k": "v"})
    whole = onnx.ModelProto()
    whole.CopyFrom(model)
    next(t for t in whole.graph.initializer if t.name == "w1").CopyFrom(
        numpy_helper.from_array(np.zeros_like(w1), "w1"))
    assert (with_weights(model, {"w1": np.zeros_like(w1)}).SerializeToString()
            == whole.SerializeToString())


def test_fields_this_onnx_does_not_know_are_kept(tmp_path: Path) -> None:
    """A model with a field a newer onnx wrote (999 here, at the model's and the graph's
    level) keeps it: such a copy falls back to a whole copy."""
    model = onnx.load(str(_mlp(tmp_path / "mlp.onnx")))
    # Field 999 as a varint: tag (999 << 3) = 7992 -> bytes F8 3E, then the value 5.
    graph = model.graph.SerializeToString() + bytes([0xF8, 0x3E, 0x05])
    model.graph.Clear()
    model.graph.ParseFromString(graph)
    model.ParseFromString(model.SerializeToString() + bytes([0xF8, 0x3E, 0x07]))
    w1 = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}["w1"]
    copy = with_weights(model, {"w1": np.ones_like(w1)})
    whole = onnx.ModelProto()
    whole.CopyFrom(model)
    next(t for t in whole.graph.initializer if t.name == "w1").CopyFrom(
        numpy_helper.from_array(np.ones_like(w1), "w1"))
    assert copy.SerializeToString() == whole.SerializeToString()
    assert copy.SerializeToString().endswith(bytes([0xF8, 0x3E, 0x07]))
