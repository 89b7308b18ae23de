"""What WER do coded block scales cost when a build's integers are kept? A copy, not a build.

    python benchmarks/scale_codes.py BUILD OUT [--bits 8]
    sfc eval OUT --json F

Copies an ort-cpu build folder to OUT and replaces every MatMulNBits scale with its nearest
value on a linear grid of 2^bits - 1 steps up to the largest scale of its output column
(llama.cpp's k-quants keep integer block scales under float16 super-scales in this spirit):
the scale a file of `bits`-bit scale codes plus one float16 per column would hold. The
integers and zero points stay as the build chose them for the exact scales, which was
expected to make the result pessimistic (a build chooses its integers for the coded
scales; measured, the build did worse, not better). The
files keep float scales: OUT is not smaller, only its numbers are those of the coded
format. Why: to measure coded scales (4.375 bits a weight for INT4 in blocks of 32 with
zero points at 8 bits, against 4.625 with float16 scales) before building them; the built
8-bit format is `sfc build --block-scales coded8`, which also re-chooses the integers
(BENCHMARKS.md, issue 10: the build measured worse than this copy).
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


def code_scales(scales: np.ndarray, n: int, bits: int) -> np.ndarray:
    """`scales` (MatMulNBits layout: N rows of blocks) on each row's grid of 2^bits - 1
    steps up to the row's largest scale; every scale stays > 0 (at least one step)."""
    rows = scales.astype(np.float64).reshape(n, -1)
    top = rows.max(axis=1, keepdims=True)
    steps = 2 ** bits - 1
    codes = np.clip(np.rint(rows / top * steps), 1, steps)
    return (codes * top / steps).astype(np.float32).reshape(scales.shape)


def recode(model: onnx.ModelProto, bits: int) -> tuple[int, float]:
    """Recode every MatMulNBits scale of `model` in place (through a Cast from float16, as
    `ort-cpu` stores them, or a float32 initializer); (how many, largest relative change)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    casts = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Cast"}
    count, worst = 0, 0.0
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            continue
        name = casts.get(node.input[2], node.input[2])
        init = inits[name]
        values = numpy_helper.to_array(init)
        n = next(a.i for a in node.attribute if a.name == "N")
        coded = code_scales(values.astype(np.float32), n, bits)
        worst = max(worst, float(np.max(np.abs(coded / values.astype(np.float32) - 1))))
        init.CopyFrom(numpy_helper.from_array(coded.astype(values.dtype), name))
        count += 1
    return count, worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("build", type=Path, help="an ort-cpu build folder")
    parser.add_argument("out", type=Path, help="the recoded copy (must not exist)")
    parser.add_argument("--bits", type=int, default=8, help="bits of each scale code")
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"{args.out} exists; give a new folder")
    if not (args.build / "card.json").is_file():
        parser.error(f"{args.build} is not a build folder (no card.json)")
    shutil.copytree(args.build, args.out, ignore=shutil.ignore_patterns("*.ort", "eval*.json"))
    found = {}
    for path in sorted(args.out.glob("*/model.ort.onnx")):
        model = onnx.load(str(path))
        found[path.parent.name] = recode(model, args.bits)
        onnx.save(model, str(path))
    print(json.dumps({"bits": args.bits, "graphs": found}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
