"""How the tied logits table's 4-bit rounding costs WER: GPTQ against MSE round-to-nearest.

Start from an ort-cpu weight-only GPTQ build whose table was left float (`sfc build
whisper-tiny.en --weights 4 --activations none --precision MAP`, MAP = {"/MatMul_16":
"float"}) and a uniform GPTQ build of the same model made with `--gptq-tied` (its
`decoder/weights.npz` holds the table's GPTQ integers). For each variant this script
writes a copy of the first build whose logits MatMul reads another table (the Gather
keeps reading FP32, so only the logits reader changes), evaluates it with `sfc eval`
and prints its WER change paired over utterances against the float-table build and
against the GPTQ table:

- gptq: the table's GPTQ 4/32 integers (zero point per block) from the second build;
- mse: 4/32 with a zero point per block, MSE-clipped scales, round to nearest;
- int8: INT8 per output channel (absmax);
- first<N>-int8: token ids below N and the special tokens at INT8, the rest as mse
  (GPT-2 BPE ids are roughly in merge order, so low ids are the frequent tokens).

    python benchmarks/table_rounding.py FLOAT_TABLE_BUILD GPTQ_TABLE_BUILD \
        [--work /tmp/table-rounding] [--json benchmarks/results/table_rounding.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from common import machine_info, outside_repo, utterance_errors
from onnx import numpy_helper

from sfc.eval.wer import paired_bootstrap_delta
from sfc.quant.spec import QuantSpec
from sfc.quant.stored import StoredWeights
from sfc.quant.weights import dequantize_weight, round_to_nearest

REPO = Path(__file__).resolve().parents[1]
BLOCK = QuantSpec(4, "block", axis=0, block_size=32, zero_point=True)
CHANNEL = QuantSpec(8, "channel", axis=1)
EOT = 50256  # GPT-2's <|endoftext|>; Whisper's special and timestamp tokens follow it


def _decoder(build: Path) -> Path:
    card = json.loads((build / "card.json").read_text())
    return build / card["_data"]["graphs"]["decoder"]["path"]


def _logits_table(model: onnx.ModelProto) -> str:
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    return next(n.input[1] for n in model.graph.node
                if n.op_type == "MatMul" and n.input[1] in gathered)


def _fake(w: np.ndarray, spec: QuantSpec) -> np.ndarray:
    q, scales = round_to_nearest(w, spec, "mse" if spec.bits < 8 else "absmax")
    return dequantize_weight(q, spec, scales)


def frequent_int8(mse: np.ndarray, int8: np.ndarray, n: int) -> np.ndarray:
    """Columns (tokens) with id < n or >= EOT from `int8`, the rest from `mse`."""
    ids = np.arange(mse.shape[1])
    return np.where(((ids < n) | (ids >= EOT))[None], int8, mse)


def tables(float_build: Path, gptq_build: Path) -> dict[str, np.ndarray]:
    """variant -> the float32 [K, V] table its logits MatMul reads."""
    model = onnx.load(str(_decoder(float_build)))
    name = _logits_table(model)
    w = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)
    w = w.astype(np.float32)
    recipe = json.loads((gptq_build / "decoder" / "recipe.json").read_text())["_data"]
    entry = next(t for t in recipe["tensors"] if t["tensor"] == name)
    if entry["method"] != "gptq":
        raise SystemExit(f"{gptq_build}: the table was rounded by {entry['method']}, not "
                         "gptq (build it with --gptq-tied)")
    stored = StoredWeights.load(gptq_build / "decoder" / "weights.npz",
                                recipe["weight_data"])
    q, scales = stored.arrays[name]
    mse, int8 = _fake(w, BLOCK), _fake(w, CHANNEL)
    out = {"gptq": dequantize_weight(q, BLOCK, scales), "mse": mse, "int8": int8}
    for n in (4096, 16384):
        out[f"first{n}-int8"] = frequent_int8(mse, int8, n)
    return out


def write_variant(float_build: Path, out: Path, table: np.ndarray) -> None:
    """A copy of `float_build` whose logits MatMul reads `table` (the Gather: FP32)."""
    if out.exists():
        shutil.rmtree(out)
    decoder = _decoder(float_build)
    shutil.copytree(float_build, out, ignore=shutil.ignore_patterns(
        "eval.json", "model.ort", "model.fp32.onnx", "model.qdq.onnx", "weights.npz"))
    model = onnx.load(str(decoder))
    name = _logits_table(model)
    model.graph.initializer.append(numpy_helper.from_array(table, f"{name}_logits"))
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] == name:
            node.input[1] = f"{name}_logits"
    target = out / decoder.relative_to(float_build)
    target.unlink()
    onnx.save(model, str(target), save_as_external_data=True, location=f"{target.name}.data")


def evaluate(folder: Path, threads: int) -> Path:
    result = folder / "eval.json"
    if not result.is_file():
        subprocess.run([sys.executable, "-m", "sfc.cli", "eval", str(folder), "--threads",
                        str(threads), "--json", str(result)], check=True,
                       stdout=subprocess.DEVNULL)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("float_build", type=Path)
    parser.add_argument("gptq_build", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/table-rounding"))
    parser.add_argument("--json", type=Path,
                        default=REPO / "benchmarks/results/table_rounding.json")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    work = outside_repo(parser, args.work, REPO)
    errors = {"float": utterance_errors(evaluate(args.float_build, args.threads))}
    for variant, table in tables(args.float_build, args.gptq_build).items():
        out = work / variant
        if not (out / "eval.json").is_file():
            write_variant(args.float_build, out, table)
        errors[variant] = utterance_errors(evaluate(out, args.threads))
    words = errors["float"][1]
    rows = {}
    for variant, (e, w) in errors.items():
        assert w == words
        row: dict[str, Any] = {"wer": sum(e) / sum(words)}
        for ref in ("float", "gptq"):
            d = paired_bootstrap_delta(errors[ref][0], e, words)
            row[f"vs_{ref}"] = {"delta": d.delta, "lo": d.lo, "hi": d.hi, "p": d.p_value}
        rows[variant] = row
        print(f"{variant:16s} WER {100 * row['wer']:6.2f}  " + "  ".join(
            f"vs {ref} {100 * row[f'vs_{ref}']['delta']:+.2f} [{100 * row[f'vs_{ref}']['lo']:+.2f}"
            f", {100 * row[f'vs_{ref}']['hi']:+.2f}]" for ref in ("float", "gptq")))
    args.json.write_text(json.dumps({"machine": machine_info(args.threads), "float_build":
                                     str(args.float_build), "variants": rows},
                                    indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
