"""sfc's own whisper-tiny.en export, quantized W8A8 and lowered for each x86 class: the
ort-cpu levers must still fire on the real graphs. A lever that stops firing on a new
export format fails here, not only in a benchmark (from export format 3, whose frame
count is symbolic, until 2d6b16f the encoder's convs silently stayed float Convs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from sfc.quant import (
    ORT_CPU_CAPS,
    ORT_CPU_SATURATING_CAPS,
    PlanConfig,
    make_plan,
    model_sha256,
    recipe_from_plan,
)
from sfc.quant.qdq import write_qdq
from sfc.targets import OrtCpuTarget
from sfc.targets.base import LoweringResult


def _lower_w8a8(export: Path, graph: str, isa: str, tmp: Path) -> LoweringResult:
    """`graph`.onnx of the export with every weight INT8 and every activation at one
    scale (the scales' values do not matter for which kernels ORT fuses)."""
    model = onnx.load(str(export / f"{graph}.onnx"))
    config = PlanConfig(weight_bits=8, activation_bits=8)
    plan = make_plan(model, config, ORT_CPU_SATURATING_CAPS if isa == "avx2" else ORT_CPU_CAPS)
    none: dict[str, float] = {}
    scales = {q.tensor: (0.05, "max", none) for q in plan.activations}
    recipe = recipe_from_plan(plan, scales, model_sha256(model), 0, config.to_dict())
    qdq = tmp / f"{graph}.qdq.onnx"
    onnx.save(write_qdq(model, recipe), str(qdq))
    target = OrtCpuTarget(isa=isa, ort_format=False, verify=False)
    return target.lower(qdq, tmp / "out", stem=graph)


@pytest.mark.parametrize("isa", ["vnni", "avx2"])
def test_the_encoder_lowers_with_no_float_weighted_op(tiny_export: Path, tmp_path: Path,
                                                      isa: str) -> None:
    model = onnx.load(str(tiny_export / "encoder.onnx"))
    assert model.graph.input[0].type.tensor_type.shape.dim[2].dim_param  # symbolic frames
    result = _lower_w8a8(tiny_export, "encoder", isa, tmp_path)
    assert result.float_weighted == ()  # the two convs included
    assert result.fused.get("MatMulIntegerToFloat", 0) >= 2 + 4 * 6


@pytest.mark.parametrize("isa", ["vnni", "avx2"])
def test_the_decoder_gathers_its_int8_table_and_has_no_float_weighted_op(
        tiny_export: Path, tmp_path: Path, isa: str) -> None:
    """The tied token table is read by Gather as INT8 rows (`GatherOfDequantized`), never
    dequantized whole at every step."""
    result = _lower_w8a8(tiny_export, "decoder", isa, tmp_path)
    assert result.float_weighted == ()
    lowered = onnx.load(str(tmp_path / "out" / result.artifact))
    made_by = {o: n for n in lowered.graph.node for o in n.output}
    gathers = [n for n in lowered.graph.node if n.op_type == "Gather"]
    table = max(lowered.graph.initializer, key=lambda t: np.prod(t.dims))
    # One table, stored for the logits MatMul and gathered along its vocabulary axis.
    assert sorted(table.dims) == [384, 51864] and table.data_type == onnx.TensorProto.INT8
    assert any(n.input[0] == table.name for n in gathers)
    assert not any(n.input[0] in made_by and made_by[n.input[0]].op_type == "DequantizeLinear"
                   for n in gathers)
