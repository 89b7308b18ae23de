"""Hadamard rotations before 4-bit weights (QuaRot / QuIP-style incoherence), screened
offline, and the tied table's written into an export copy for WER builds (BENCHMARKS.md,
issue 10).

A MatMul x W computes the same as (x R)(R^T W) for an orthogonal R; rounding R^T W
instead of W spreads a few large input channels over whole blocks, so block scales fit
better. R here is D H: random signs D (seeded) times a block-diagonal Hadamard of blocks
of 32, one block per 32 input channels (a quantization block of 32 or 128 holds whole
Hadamard blocks).

    SFC_CACHE=... python benchmarks/hadamard_rotation.py layers [--model whisper-tiny.en]
        each encoder MatMul's 4/32 and 4/128 output error on held-out clips (Grams on
        calibration clips 1-48, error on clips 49-72), round to nearest and GPTQ, with and
        without rotating its input
    SFC_CACHE=... python benchmarks/hadamard_rotation.py export table OUT \
        --map MAP_IN --map-out MAP_OUT [--model whisper-tiny.en]
        a copy of the model's export folder with the tied table rotated (its MatMul reads
        x R, its Gather's rows are turned back by R^T), the rotations as float MatMuls;
        MAP_OUT is MAP_IN with those MatMuls kept float, for `lowbit_table.py --model OUT
        --precision MAP_OUT`

The encoder and decoder MatMul inputs are rotated by `sfc build --rotate GRAPH`
(`sfc.quant.rotate`, `lowbit_table.py --rotate GRAPH`). The twenty-sixth session's copies
were made by this script's earlier `export encoder|decoder` (commit 3d33946: the same
signs, drawn in the same order from the same seed, written as K x K MatMuls); the built-in
rotation gives the same signs and weights (within 7e-18).

The table's logits KL is `table_kl.py`'s screen on the rotated table. The table copy's
rotations are full K x K float MatMuls: an accuracy screen, not a deployable layout (their
bytes are left out of the bits BENCHMARKS.md quotes).
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
import scipy.linalg
from onnx import helper, numpy_helper

from sfc.eval.manifest import read_manifest
from sfc.models import model_folder
from sfc.paths import BUNDLED_DATA
from sfc.quant.gptq import GptqConfig, gptq_quantize
from sfc.quant.spec import QuantSpec
from sfc.quant.weights import dequantize_weight, round_to_nearest
from sfc.runtime.audio import load_audio
from sfc.runtime.features import LogMelSpec, whisper_windows

HADAMARD = 32


def rotation(k: int, rng: np.random.Generator) -> np.ndarray:
    """D H: random signs times a block-diagonal Hadamard (blocks of 32), orthogonal."""
    h = scipy.linalg.hadamard(HADAMARD) / np.sqrt(HADAMARD)
    return np.diag(rng.choice([-1.0, 1.0], k)) @ scipy.linalg.block_diag(*[h] * (k // HADAMARD))


def _grams(model: onnx.ModelProto, inputs: list[str], fit: int, test: int
           ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """Each input's Gram over the first `fit` calibration clips and the next `test`."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for x in inputs:
        model.graph.output.append(helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString())
    fit_g: dict[str, np.ndarray] = {}
    test_g: dict[str, np.ndarray] = {}
    rows = 0
    for i, clip in enumerate(read_manifest(BUNDLED_DATA / "calib")[: fit + test]):
        window = whisper_windows(load_audio(clip.audio), LogMelSpec())[:1]
        values = session.run(inputs, {"input_features": window})
        into = fit_g if i < fit else test_g
        for x, v in zip(inputs, values, strict=True):
            v = v.reshape(-1, v.shape[-1]).astype(np.float64)
            into[x] = into.get(x, 0.0) + v.T @ v
        rows += values[0].size // values[0].shape[-1] if i < fit else 0
    return fit_g, test_g, rows


def layers(model_name: str) -> None:
    model = onnx.load(str(model_folder(model_name) / "encoder.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    weights = {n.name: (n.input[0], numpy_helper.to_array(inits[n.input[1]]).astype(np.float64))
               for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
               and "/encoder/layers." in n.name}
    inputs = sorted({x for x, _ in weights.values()})
    fit, test, rows = _grams(model, inputs, 48, 24)
    rng = np.random.default_rng(0)
    rots = {x: rotation(fit[x].shape[0], rng) for x in inputs}
    print(f"{'MatMul':46s} fmt    RTN      RTN rot  GPTQ     GPTQ rot  (error / output energy)")
    ratios: dict[int, list[float]] = {}
    for name, (x, w) in sorted(weights.items()):
        energy = np.trace(w.T @ test[x] @ w)
        for block in (32, 128):
            spec = QuantSpec(4, "block", 0, block, zero_point=True, scale_bits=32)
            errors = []
            for r in (np.eye(w.shape[0]), rots[x]):
                wr = (r.T @ w).astype(np.float32)
                q, s = round_to_nearest(wr, spec, "mse")
                e_rtn = w - r @ dequantize_weight(q, spec, s)
                q, s = gptq_quantize(wr, r.T @ fit[x] @ r, rows, spec, GptqConfig())
                e_gptq = w - r @ dequantize_weight(q, spec, s)
                errors += [np.trace(e.T @ test[x] @ e) / energy for e in (e_rtn, e_gptq)]
            ratios.setdefault(block, []).append(errors[3] / errors[1])
            print(f"{name:46s} 4/{block:<4d}" + " ".join(f"{e:.2e}" for e in
                  (errors[0], errors[2], errors[1], errors[3])), flush=True)
    for block, r in ratios.items():
        print(f"4/{block}: GPTQ rotated / unrotated: median {np.median(r):.2f}, "
              f"{min(r):.2f}-{max(r):.2f}")


def _rotate_table(model: onnx.ModelProto, rng: np.random.Generator) -> list[str]:
    """The tied table [K, V] stored as R^T table; its MatMul reads x R, the Transpose after
    its Gather (axis 1) gets rows e' R^T back."""
    g = model.graph
    table = next(t for t in g.initializer if t.name == "table")
    w = numpy_helper.to_array(table).astype(np.float64)
    r = rotation(w.shape[0], rng)
    table.CopyFrom(numpy_helper.from_array((r.T @ w).astype(np.float32), "table"))
    g.initializer.extend([numpy_helper.from_array(r.astype(np.float32), "rot_R"),
                          numpy_helper.from_array(r.T.astype(np.float32), "rot_RT")])
    nodes = list(g.node)
    matmul = next(n for n in nodes if n.op_type == "MatMul" and n.input[1] == "table")
    gather = next(n for n in nodes if n.op_type == "Gather" and n.input[0] == "table")
    transpose = next(n for n in nodes if gather.output[0] in n.input)
    before = {matmul.name: helper.make_node("MatMul", [matmul.input[0], "rot_R"], ["rot_x"],
                                            name="/rot_logits")}
    matmul.input[0] = "rot_x"
    rows = transpose.output[0]
    transpose.output[0] = rows + "_rotated"
    after = {transpose.name: helper.make_node("MatMul", [rows + "_rotated", "rot_RT"], [rows],
                                              name="/rot_embed")}
    _insert(g, before, after)
    return ["/rot_logits", "/rot_embed"]


def _insert(g: onnx.GraphProto, before: dict[str, onnx.NodeProto],
            after: dict[str, onnx.NodeProto]) -> None:
    nodes = []
    for n in g.node:
        nodes += [before[n.name]] if n.name in before else []
        nodes.append(n)
        nodes += [after[n.name]] if n.name in after else []
    del g.node[:]
    g.node.extend(nodes)


def export(model_name: str, out: Path, map_in: Path, map_out: Path) -> None:
    graph = "decoder"  # the tied table's
    shutil.copytree(model_folder(model_name), out, dirs_exist_ok=True)
    model = onnx.load(str(out / f"{graph}.onnx"))
    names = _rotate_table(model, np.random.default_rng(0))
    onnx.checker.check_model(model)
    onnx.save(model, str(out / f"{graph}.onnx"))
    entries = json.loads(map_in.read_text())
    entries.update({f"{graph}:{n}": "float" for n in names})
    map_out.write_text(json.dumps(entries, indent=1) + "\n")
    print(f"{out}: {len(names)} rotation MatMuls in {graph}.onnx; map {map_out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("layers", "export"))
    parser.add_argument("where", nargs="?", choices=("table",))
    parser.add_argument("out", nargs="?", type=Path)
    parser.add_argument("--model", default="whisper-tiny.en")
    parser.add_argument("--map", type=Path)
    parser.add_argument("--map-out", type=Path)
    args = parser.parse_args()
    if args.what == "layers":
        layers(args.model)
    elif args.where is None or args.out is None or args.map is None or args.map_out is None:
        parser.error("export needs table, OUT, --map and --map-out")
    else:
        export(args.model, args.out, args.map, args.map_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
