"""How much a zero point per block cuts the rounding error of a Whisper export's weights.

    SFC_CACHE=/tmp/sfccache python benchmarks/zero_point_error.py [--model whisper-tiny.en]

For every 2-D MatMul weight of the FP32 export (blocks along K, as sfc stores them):
sum of squared round-to-nearest error over sum of squared weights, with MSE-clipped
scales (sfc's `mse` method), symmetric against one zero point per block, at blocks of
32, 64 and 128. Weights only: no calibration data, no model run.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
from onnx import numpy_helper

from sfc.models import model_folder
from sfc.quant.spec import QuantSpec
from sfc.quant.weights import dequantize_weight, round_to_nearest


def matmul_weights(folder) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    out = []
    for graph in ("encoder", "decoder"):
        model = onnx.load(str(folder / f"{graph}.onnx"))
        inits = {t.name: t for t in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "MatMul" and node.input[1] in inits:
                w = numpy_helper.to_array(inits[node.input[1]])
                if w.ndim == 2:
                    out.append(w)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="whisper-tiny.en")
    parser.add_argument("--bits", type=int, default=4)
    args = parser.parse_args()
    weights = matmul_weights(model_folder(args.model))
    total = sum(float(np.sum(w.astype(np.float64) ** 2)) for w in weights)
    print(f"{args.model}: {len(weights)} MatMul weights, INT{args.bits}, mse scales")
    for block in (32, 64, 128):
        errors = []
        for zero_point in (False, True):
            spec = QuantSpec(args.bits, "block", axis=0, block_size=block, zero_point=zero_point)
            err = 0.0
            for w in weights:
                q, s = round_to_nearest(w, spec, "mse")
                err += float(np.sum((dequantize_weight(q, spec, s) - w).astype(np.float64) ** 2))
            errors.append(err / total)
        print(f"block {block}: symmetric {100 * errors[0]:.2f}%, zero point "
              f"{100 * errors[1]:.2f}% (ratio {errors[1] / errors[0]:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
