"""SmoothQuant-style activation smoothing, tried under the W8A8 default build: migrate
each quantized MatMul input's per-channel range into the weights, folding 1/s into the op
that makes the input, then build from the folded export like any other.

    python benchmarks/smooth_fold.py whisper-base OUT [--alpha 0.5] [--clips 32]
    sfc build OUT --seed 2 ...

Per input x of MatMuls with constant 2-D weights, s_j = max|x_j|^alpha /
max|W_j,:|^(1 - alpha) (Xiao et al., SmoothQuant; max|x_j| over the first --clips
calibration clips, max|W_j| over every MatMul reading x), folded exactly in FP32 where the
producer is linear per channel: a LayerNormalization (gamma / s, beta / s) or a Mul by a
constant (GELU's trailing 0.5 becomes the vector 0.5 / s); the MatMuls' weight rows * s.
Inputs read by anything else (but Shape), and weights read by another op too (the tied table), are
left alone. The scales go to OUT/smooth.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from sfc.calib.feeds import whisper_feeds
from sfc.card import ModelCard
from sfc.eval.manifest import read_manifest
from sfc.models import model_folder
from sfc.paths import BUNDLED_DATA
from sfc.runtime.whisper import WhisperRuntime


def _readers(m: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in m.graph.node:
        for i in node.input:
            out.setdefault(i, []).append(node)
    return out


def sites(m: onnx.ModelProto) -> dict[str, tuple[onnx.NodeProto, list[str]]]:
    """Smoothable inputs: tensor -> (its producer, the weights of the MatMuls reading it)."""
    inits = {t.name for t in m.graph.initializer}
    readers = _readers(m)
    outputs = {o.name for o in m.graph.output}
    producers = {o: n for n in m.graph.node for o in n.output}
    consts = {n.output[0] for n in m.graph.node if n.op_type == "Constant"} | inits
    found = {}
    for x, nodes in readers.items():
        p = producers.get(x)
        if p is None or x in outputs:
            continue
        # Shape readers do not see the values.
        mms = [n for n in nodes if n.op_type != "Shape"]
        if not mms or not all(n.op_type == "MatMul" and n.input[0] == x
                              and n.input[1] in inits for n in mms):
            continue
        ws = [n.input[1] for n in mms]
        if any(len(readers[w]) > 1 for w in ws):
            continue
        if p.op_type == "LayerNormalization" and len(p.input) == 3 and all(
                len(readers[t]) == 1 for t in p.input[1:]):
            found[x] = (p, ws)
        elif (p.op_type == "Mul" and p.input[1] in consts and len(readers[p.input[1]]) == 1):
            found[x] = (p, ws)
    return found


def absmax(folder: Path, graph: str, m: onnx.ModelProto, tensors: list[str],
           clips: int) -> dict[str, np.ndarray]:
    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    for t in tensors:
        probe.graph.output.append(helper.make_empty_tensor_value_info(t))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(probe.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    runtime = WhisperRuntime.open(folder, threads=2)
    utterances = read_manifest(BUNDLED_DATA / "calib")[:clips]
    out: dict[str, np.ndarray] = {}
    for i, feed in enumerate(whisper_feeds(runtime, utterances, graph)):
        values = sess.run(tensors, feed)
        for t, v in zip(tensors, values, strict=True):
            a = np.abs(v.reshape(-1, v.shape[-1])).max(axis=0)
            out[t] = a if t not in out else np.maximum(out[t], a)
        print(f"{graph}: clip {i + 1}/{len(utterances)}", flush=True)
    return out


def fold(model: str, out: Path, alpha: float, clips: int) -> dict[str, dict[str, float]]:
    folder = model_folder(model)
    card = ModelCard.load(folder)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(folder, out)
    report: dict[str, dict[str, float]] = {}
    for name, spec in card.graphs.items():
        m = onnx.load(str(folder / spec.path))
        found = sites(m)
        xmax = absmax(folder, name, m, sorted(found), clips)
        inits = {t.name: t for t in m.graph.initializer}
        consts = {n.output[0]: n for n in m.graph.node if n.op_type == "Constant"}
        for x, (p, ws) in sorted(found.items()):
            w = {k: numpy_helper.to_array(inits[k]).astype(np.float64) for k in ws}
            wmax = np.max([np.abs(v).max(axis=1) for v in w.values()], axis=0)
            s = np.maximum(xmax[x], 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)
            s = np.clip(s, 1e-5, None)
            if p.op_type == "LayerNormalization":
                for t in p.input[1:]:
                    v = numpy_helper.to_array(inits[t])
                    inits[t].CopyFrom(numpy_helper.from_array((v / s).astype(np.float32), t))
            else:
                c = p.input[1]
                if c in consts:
                    v = numpy_helper.to_array(consts[c].attribute[0].t)
                    consts[c].attribute[0].t.CopyFrom(
                        numpy_helper.from_array((v / s).astype(np.float32), c))
                else:
                    v = numpy_helper.to_array(inits[c])
                    inits[c].CopyFrom(numpy_helper.from_array((v / s).astype(np.float32), c))
            for k, v in w.items():
                inits[k].CopyFrom(numpy_helper.from_array(
                    (v * s[:, None]).astype(np.float32), k))
            ratio = float(xmax[x].max() / np.median(xmax[x]))
            after = xmax[x] / s
            report[f"{name}:{x}"] = {
                "producer": p.op_type, "outlier_ratio_before": ratio,
                "outlier_ratio_after": float(after.max() / np.median(after)),
                "s_min": float(s.min()), "s_max": float(s.max())}
            print(f"{name} {x} ({p.op_type}): max/median {ratio:.1f} -> "
                  f"{report[f'{name}:{x}']['outlier_ratio_after']:.1f}", flush=True)
        onnx.save(m, str(out / spec.path))
    (out / "smooth.json").write_text(json.dumps(
        {"alpha": alpha, "clips": clips, "sites": report}, indent=1) + "\n")
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("out", type=Path)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--clips", type=int, default=32)
    args = parser.parse_args()
    fold(args.model, args.out, args.alpha, args.clips)
    return 0


if __name__ == "__main__":
    sys.exit(main())
