"""Which role of a quantized tied logits/embedding table carries its WER loss.

A Whisper decoder reads its token table twice: a Gather (the input embedding) and the
final MatMul (the logits). For an ort-cpu build folder, this script writes two copies of
the build in which one reader at a time reads the FP32 table (from the build's own
`model.fp32.onnx`) while everything else stays as built, evaluates both with `sfc eval`
on all of `calibration_data/eval`, and prints each copy's WER change against the build,
paired over utterances (the build's own `eval.json` is the reference, so evaluate the
build first). The copies' decoder is the QDQ graph, optimised by ONNX Runtime at load.

    python benchmarks/table_roles.py /tmp/sfc-lowbit/whisper-tiny.en/w4-b32-gptq \
        --work /tmp/table-roles
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
from common import outside_repo, utterance_errors

from sfc.eval.wer import paired_bootstrap_delta

REPO = Path(__file__).resolve().parents[1]
ROLES = {"embedding": "Gather", "logits": "MatMul"}


def float_role(build: Path, out: Path, role: str) -> None:
    """Copy `build` to `out` with the tied table's `role` reader reading the FP32 table."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(build, out, ignore=shutil.ignore_patterns("eval.json", "model.ort"))
    fp32 = onnx.load(str(build / "decoder/model.fp32.onnx"))
    gathered = {n.input[0] for n in fp32.graph.node if n.op_type == "Gather"}
    multiplied = {i for n in fp32.graph.node if n.op_type == "MatMul" for i in n.input}
    table = next(t for t in fp32.graph.initializer
                 if t.name in gathered and t.name in multiplied)
    model = onnx.load(str(build / "decoder/model.qdq.onnx"))
    producer = {o: n for n in model.graph.node for o in n.output}
    def reads_table(name: str) -> bool:
        dq = producer.get(name)
        return dq is not None and dq.op_type == "DequantizeLinear" \
            and dq.input[0].startswith(f"{table.name}_quantized")

    node = next(n for n in model.graph.node
                if n.op_type == ROLES[role] and any(reads_table(i) for i in n.input))
    k = next(j for j, i in enumerate(node.input) if reads_table(i))
    model.graph.node.remove(producer[node.input[k]])
    node.input[k] = table.name
    model.graph.initializer.append(table)
    used = {i for n in model.graph.node for i in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    card = json.loads((out / "card.json").read_text())
    onnx.save(model, str(out / card["_data"]["graphs"]["decoder"]["path"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("build", type=Path, help="an ort-cpu build folder, already evaluated")
    parser.add_argument("--work", type=Path, default=Path("/tmp/table-roles"))
    args = parser.parse_args()
    work = outside_repo(parser, args.work, REPO)
    reference = args.build / "eval.json"
    if not reference.is_file():
        parser.error(f"{reference} not found: build it with `sfc build` (which writes "
                     f"eval.json) or run `sfc eval {args.build} --json {reference}`")
    base_errors, words = utterance_errors(reference)
    for role in ROLES:
        out = work / f"{role}-float"
        float_role(args.build, out, role)
        subprocess.run([sys.executable, "-m", "sfc.cli", "eval", str(out), "--threads", "1",
                        "--json", str(out / "eval.json")], check=True, stdout=subprocess.DEVNULL)
        errors, same_words = utterance_errors(out / "eval.json")
        assert same_words == words
        d = paired_bootstrap_delta(base_errors, errors, words)
        print(f"{role} read from FP32: {100 * d.delta:+.2f} [{100 * d.lo:+.2f}, {100 * d.hi:+.2f}]"
              f" WER points against the build, p = {d.p_value:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
