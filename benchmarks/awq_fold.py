"""AWQ-style scaling tried on top of GPTQ: fold a per-input-channel scale into each
LayerNorm (gamma, beta / s) and the MatMuls it feeds (rows * s), then build from the folded
export like any other.

    python benchmarks/awq_fold.py whisper-tiny.en OUT [--clips 24]
    python benchmarks/lowbit_table.py --model OUT --variants w4-b32-gptq \\
        --work /tmp/sfc-lowbit-awq --json /tmp/lowbit_awq.json

Per LayerNorm group, s = sqrt(diag H)^alpha (H: the MatMul input's Gram matrix on the
first --clips calibration clips, geometric-mean normalised) with alpha from {0, .25, .5,
.75} minimising the summed relative GPTQ layer-output error of the group at INT4 block 32;
alpha 0 leaves the group unchanged. The fold is exact in FP32. Weights read by another op
too (the tied table) are left alone. The chosen alphas go to OUT/awq.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from sfc.build import BuildConfig, _grams, _prepare, _stats, target_caps
from sfc.calib.feeds import whisper_feeds
from sfc.card import ModelCard
from sfc.eval.manifest import read_manifest
from sfc.models import model_folder
from sfc.paths import BUNDLED_DATA
from sfc.quant.gptq import GptqConfig, gptq_quantize
from sfc.quant.spec import QuantSpec
from sfc.quant.weights import dequantize_weight
from sfc.runtime.whisper import WhisperRuntime

ALPHAS = (0.0, 0.25, 0.5, 0.75)
SPEC = QuantSpec(4, "block", axis=0, block_size=32)


def grams(model: str, clips: int) -> dict[str, dict[str, tuple[np.ndarray, int]]]:
    """graph -> weight -> (X^T X, rows) of its MatMul input, as a GPTQ build collects."""
    folder = model_folder(model)
    card = ModelCard.load(folder)
    config = BuildConfig(weights=4, activations=None, weight_method="gptq", calibrator="mse")
    runtime = WhisperRuntime.open(folder)
    utterances = read_manifest(BUNDLED_DATA / "calib")[:clips]
    out = {}
    for name, spec in card.graphs.items():
        g = _prepare(name, onnx.load(str(folder / spec.path)), config,
                     target_caps(config.target), False)
        accs = _grams(g.model, g.plan)
        _stats(g.model, g.plan, whisper_feeds(runtime, utterances, name), clips, name, accs)
        out[name] = {t: (a.gram.copy(), a.count) for t, a in accs.items()}
    return out


def group_error(ws: dict[str, np.ndarray], gram: np.ndarray, count: int,
                s: np.ndarray) -> float:
    """Summed relative output error of GPTQ INT4/32 on the scaled weights, in the original
    input space."""
    h = gram / count
    total = 0.0
    for w in ws.values():
        q, sc = gptq_quantize((w * s[:, None]).astype(np.float32), gram / np.outer(s, s),
                              count, SPEC, GptqConfig())
        d = w - dequantize_weight(q, SPEC, sc).astype(np.float64) / s[:, None]
        total += np.einsum("ij,ik,kj->", d, h, d) / np.einsum("ij,ik,kj->", w, h, w)
    return total


def fold(model: str, out: Path, clips: int) -> dict[str, list[float]]:
    data = grams(model, clips)
    folder = model_folder(model)
    card = ModelCard.load(folder)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(folder, out)
    chosen = {}
    for name, spec in card.graphs.items():
        m = onnx.load(str(folder / spec.path))
        inits = {t.name: t for t in m.graph.initializer}
        readers: dict[str, list[onnx.NodeProto]] = {}
        for node in m.graph.node:
            for i in node.input:
                readers.setdefault(i, []).append(node)
        for ln in (n for n in m.graph.node if n.op_type == "LayerNormalization"):
            mms = [c for c in readers.get(ln.output[0], [])
                   if c.op_type == "MatMul" and c.input[1] in data[name]]
            names = [c.input[1] for c in mms]
            if not mms or any(len(readers[w]) > 1 for w in names):
                continue
            gram, count = data[name][names[0]]
            d = np.sqrt(np.maximum(np.diag(gram / count), 1e-12))
            ws = {w: numpy_helper.to_array(inits[w]).astype(np.float64) for w in names}

            def scale(alpha: float, d: np.ndarray = d) -> np.ndarray:
                s = d ** alpha
                return s / np.sqrt(s.max() * s.min())

            errors = {a: group_error(ws, gram, count, scale(a)) for a in ALPHAS}
            best = min(errors, key=lambda a: errors[a])
            chosen[f"{name}:{ln.name}"] = [best, errors[best] / errors[0.0]]
            print(f"{name} {ln.name}: alpha {best}, error x{errors[best] / errors[0.0]:.3f}",
                  flush=True)
            if best == 0.0:
                continue
            s = scale(best)
            for idx in (1, 2):
                t = inits[ln.input[idx]]
                t.CopyFrom(numpy_helper.from_array(
                    (numpy_helper.to_array(t) / s).astype(np.float32), t.name))
            for w, value in ws.items():
                inits[w].CopyFrom(numpy_helper.from_array(
                    (value * s[:, None]).astype(np.float32), w))
        onnx.save(m, str(out / spec.path))
    (out / "awq.json").write_text(json.dumps(chosen, indent=1) + "\n")
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("out", type=Path)
    parser.add_argument("--clips", type=int, default=24)
    args = parser.parse_args()
    fold(args.model, args.out, args.clips)
    return 0


if __name__ == "__main__":
    sys.exit(main())
