"""Sub-8-bit weights on whisper: RTN vs MSE vs GPTQ, and the mixed-precision Pareto table.

    python benchmarks/lowbit_table.py [--model whisper-tiny.en] [--variants a,b,...]
    python benchmarks/lowbit_table.py --show
    python benchmarks/lowbit_table.py --compare A/precision.json B/precision.json

Every variant is a fresh `sfc build` (bundled calibration set, seed 0) judged on the
whole eval set with the paired bootstrap against FP32; results go to
benchmarks/results/lowbit_<model>.json, one key per variant, so an interrupted run
resumes where it stopped. Average bits count scales (INT4 block 32 = 5.0) over the
weights the plan quantizes; MB is the deployed artifacts' real bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx
from common import build_variant, machine_info, machine_line, outside_repo, print_table, run_or_show

from sfc.eval.manifest import read_manifest
from sfc.eval.wer import count_errors, paired_bootstrap_delta
from sfc.paths import BUNDLED_DATA
from sfc.precision.budget import Budget, storage_bits
from sfc.precision.mapfile import load_precision
from sfc.precision.onestage import OneStageConfig
from sfc.precision.search import DEFAULT_CANDIDATES, SearchConfig
from sfc.quant.gptq import GptqConfig
from sfc.quant.plan import LayerPrecision
from sfc.quant.recipe import Recipe

REPO = Path(__file__).resolve().parent.parent

# Float32 block scales: what every variant measured before float16 became ort-cpu's default
# (the -h16 variants set 16).
NONE = {"activations": None, "calibrator": "mse", "block_scale_bits": 32}


def _mixed(bits: float, method: str = "gptq", **extra: Any) -> dict[str, Any]:
    return {**NONE, "weights": "mixed", "weight_method": method,
            "search": SearchConfig(Budget(avg_bits=bits)), **extra}


def _one_stage(bits: float, steps: int, finetune: int, augment: int = 0,
               candidates: tuple[str, ...] = DEFAULT_CANDIDATES, **knobs: Any
               ) -> dict[str, Any]:
    search = SearchConfig(Budget(avg_bits=bits), candidates, method="one-stage",
                          one_stage=OneStageConfig(steps=steps, finetune_steps=finetune,
                                                   augment=augment, **knobs))
    return {**NONE, "weights": "mixed", "search": search}


# The MatMul that reads the tied logits/embedding table (the decoder's last MatMul).
TABLE = {"whisper-tiny.en": "/MatMul_16", "whisper-base": "/MatMul_24"}


def variants(model: str) -> dict[str, dict[str, Any]]:
    """Every variant this script knows, for `model` (the table's node name differs)."""
    table = TABLE.get(model, "/MatMul_16")
    return {
        "w4-b32-rtn": {**NONE, "weights": 4, "weight_method": "rtn"},
        "w4-b32-mse": {**NONE, "weights": 4, "weight_method": "mse"},
        "w4-b32-gptq": {**NONE, "weights": 4, "weight_method": "gptq"},
        # The tied table GPTQ'd, or MSE-rounded, whatever the held-out check says
        # (`--gptq-tied gptq|mse`; the default, auto, decides per table).
        "w4-b32-gptq-tied": {**NONE, "weights": 4, "weight_method": "gptq",
                             "gptq": GptqConfig(tied="gptq")},
        "w4-b32-gptq-table-mse": {**NONE, "weights": 4, "weight_method": "gptq",
                                  "gptq": GptqConfig(tied="mse")},
        # The peer (llm-compressor's Whisper example) leaves the tied logits table float.
        "w4-b32-gptq-table-float": {**NONE, "weights": 4, "weight_method": "gptq",
                                    "precision": (LayerPrecision(table, weights="float"),)},
        "w4-b32-gptq-table8": {**NONE, "weights": 4, "weight_method": "gptq",
                               "precision": (LayerPrecision(table, weights=8),)},
        "w4-b64-rtn": {**NONE, "weights": 4, "block_size": 64, "weight_method": "rtn"},
        "w4-b64-mse": {**NONE, "weights": 4, "block_size": 64, "weight_method": "mse"},
        "w4-b64-gptq": {**NONE, "weights": 4, "block_size": 64, "weight_method": "gptq"},
        "w8": {**NONE, "weights": 8},
        # Sequential GPTQ (`--gptq-stages N`): each graph's MatMuls in N stages.
        **{f"w4-b{b}-gptq-seq{n}": {**NONE, "weights": 4, "weight_method": "gptq",
                                    "block_size": b, "gptq": GptqConfig(stages=n)}
           for b in (32, 64, 128) for n in (4, 8, 64)},
        "w4-b128-gptq": {**NONE, "weights": 4, "block_size": 128, "weight_method": "gptq"},
        # GPTQ's dampening (`--gptq-damp`; 0.01 is the default): a decoder weight's Gram
        # has about as many calibration rows (tokens) as it has columns.
        **{f"w4-b32-gptq-damp{d:g}": {**NONE, "weights": 4, "weight_method": "gptq",
                                      "gptq": GptqConfig(damp=d)}
           for d in (0.001, 0.1, 0.3)},
        "w2-b32-gptq": {**NONE, "weights": 2, "weight_method": "gptq"},
        "mixed-6": _mixed(6.0),
        "mixed-5": _mixed(5.0),
        "mixed-4.5": _mixed(4.5),
        "mixed-4": _mixed(4.0),
        "mixed-3.5": _mixed(3.5),
        "mixed-3": _mixed(3.0),
        # Just under uniform 4/128 with zero points (4.336 bits on tiny.en): mixed against
        # uniform at equal size.
        "mixed-4.33": _mixed(4.33),
        # With 4/64 among the candidates (uniform 4/64 measured better than the 4.5-bit mix).
        "mixed-4.5-c64": _mixed(4.5, search=SearchConfig(
            Budget(avg_bits=4.5), candidates=("8", "4/32", "4/64", "4/128", "2/32"))),
        "mixed-5-c64": _mixed(5.0, search=SearchConfig(
            Budget(avg_bits=5.0), candidates=("8", "4/32", "4/64", "4/128", "2/32"))),
        # With INT4 blocks of 512 (4.07 bits with its zero points, against 4.28 for 4/128):
        # at 4.0 bits the default candidates must put about a fifth of the weights at 2-bit.
        "mixed-4-c512": _mixed(4.0, search=SearchConfig(
            Budget(avg_bits=4.0), candidates=("8", "4/32", "4/128", "4/512", "2/32"))),
        # Float16 block scales (`--block-scales float16`): INT4 in blocks of 32 with zero
        # points at 4.625 bits instead of 5.125, 2/32 at 2.625 instead of 3.125.
        "w4-b32-gptq-h16": {**NONE, "weights": 4, "weight_method": "gptq",
                            "block_scale_bits": 16},
        # 8-bit scale codes times a float16 step per column (`--block-scales coded8`).
        "w4-b32-gptq-c8": {**NONE, "weights": 4, "weight_method": "gptq", "block_scale_bits": 8},
        "w4-b64-gptq-h16": {**NONE, "weights": 4, "block_size": 64, "weight_method": "gptq",
                            "block_scale_bits": 16},
        "mixed-4.5-c64-h16": _mixed(4.5, block_scale_bits=16, search=SearchConfig(
            Budget(avg_bits=4.5), candidates=("8", "4/32", "4/64", "4/128", "2/32"))),
        "mixed-4-h16": _mixed(4.0, block_scale_bits=16, search=SearchConfig(
            Budget(avg_bits=4.0), candidates=("8", "4/64", "4/128", "4/512", "2/32"))),
        # 8-bit scale codes make 4/32 cost 4.42 bits on tiny.en, leaving room at 4.5 for
        # INT8 where the probes say it matters.
        "mixed-4.5-c8": _mixed(4.5, block_scale_bits=8, search=SearchConfig(
            Budget(avg_bits=4.5), candidates=("8", "4/32", "4/64", "2/32"))),
        # W{2,4,8}A8: ESC activations on top of the mixed weights (ort-cpu runs the 4/2-bit
        # layers weight-only, sim quantizes every input).
        "mixed-4.5-a8": _mixed(4.5, activations=8, calibrator="esc"),
        "mixed-4.5-a8-sim": _mixed(4.5, activations=8, calibrator="esc", target="sim"),
        "w8a8-esc": {"weights": 8, "activations": 8, "calibrator": "esc"},
        # One-stage (issue 11), short runs that fit a 2-core session: 4 clips per step.
        # The first one-stage runs (onestage-4.5-s100, onestage-5-s100-aug in
        # results/lowbit_whisper-tiny.en-onestage.json) ran the code of commit 3304fde:
        # absolute-rate scales and fine-tuning from the search's own latents. This code
        # no longer has that parameterization, so they are not variants here any more.
        # Fine-tuning from GPTQ at the chosen formats, relative-rate scales:
        "onestage-4.5-gptq": _one_stage(4.5, 100, 100, augment=1),
        "onestage-5-gptq": _one_stage(5.0, 100, 100, augment=1),
        "onestage-4-gptq": _one_stage(4.0, 100, 100, augment=1),
        # Four times the steps on two augmented copies of each clip (a GPU's run).
        "onestage-4.5-long": _one_stage(4.5, 400, 400, augment=2),
        # Sized for one 600 s call on an H100 (about 545 s by onestage-4.5-long's phase
        # times: 300 + 300 steps on one augmented copy of each clip).
        "onestage-4.5-300": _one_stage(4.5, 300, 300, augment=1),
        # One candidate: no search, GPTQ 4/32 everywhere fine-tuned by distillation (QAT).
        "qat-4-32": _one_stage(5.1, 1, 150, augment=1, candidates=("4/32",),
                               finetune_schedule="constant"),
        # The same with a zero point per block (4/32 is then 5.125 bits; convs stay INT8).
        "qat-4-32-zp": _one_stage(5.2, 1, 150, augment=1, candidates=("4/32",),
                                  finetune_schedule="constant"),
        # Longer, on three augmented copies of each clip, the rate decayed linearly.
        "qat-4-32-300": _one_stage(5.1, 1, 300, augment=3, candidates=("4/32",)),
        # With a --precision map that fixes every weight's format (a two-stage choice,
        # `resolve_mix.py`): GPTQ at those formats fine-tuned by distillation as qat-4-32.
        # The map decides the size; the budget only has to admit it.
        "qat-map": _one_stage(8.0, 1, 150, augment=1, finetune_schedule="constant"),
        "qat-map-100": _one_stage(8.0, 1, 100, augment=1, finetune_schedule="constant"),
        # Four times as long, the rate decayed linearly (a GPU's run: 0.1 s a step on an H100).
        "qat-map-600": _one_stage(8.0, 1, 600, augment=2),
        # The same fine-tuning against each block's output (`--finetune-objective blocks`).
        "qat-map-blocks": _one_stage(8.0, 1, 150, augment=1, finetune_schedule="constant",
                                     objective="blocks"),
        "qat-map-blocks-100": _one_stage(8.0, 1, 100, augment=1,
                                         finetune_schedule="constant", objective="blocks"),
        "qat-map-blocks-200": _one_stage(8.0, 1, 200, augment=1,
                                         finetune_schedule="constant", objective="blocks"),
    }


def avg_bits(folder: Path) -> float:
    """Stored bits per parameter of the weighted ops' weights (MatMul / Gemm / Conv B),
    scales counted, float ones at 32 bits, each tensor once, over all graphs."""
    bits = params = 0
    for recipe_path in sorted(folder.glob("*/recipe.json")):
        recipe = Recipe.load(recipe_path)
        model = onnx.load(str(recipe_path.parent / "model.fp32.onnx"), load_external_data=False)
        shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
        weights = {n.input[1] for n in model.graph.node
                   if n.op_type in ("MatMul", "Gemm", "Conv") and n.input[1] in shapes}
        specs = {t.tensor: t.spec for t in recipe.tensors if t.kind == "weight"}
        for name in sorted(weights | set(specs)):
            bits += storage_bits(shapes[name], specs.get(name))
            params += math.prod(shapes[name])
    return bits / params


def run(args: argparse.Namespace) -> int:
    work = outside_repo(argparse.ArgumentParser(), Path(args.work), REPO)
    path = Path(args.json)
    results = json.loads(path.read_text()) if path.is_file() else {}
    results["machine"] = machine_info(args.threads or 0)
    known = variants(args.model)
    for name in (args.variants.split(",") if args.variants else known):
        if name not in known:
            raise SystemExit(f"unknown variant {name!r} (known: {', '.join(known)})")
        config = dict(known[name])
        if args.calib:  # another calibration set: its own key, so both rows are kept
            config["calib"] = Path(args.calib).resolve()
            name = f"{name}@{config['calib'].name}"
        if args.precision:  # a hand-written or re-solved map on top: its own key too
            config["precision"] = load_precision(Path(args.precision))
            name = f"{name}+{Path(args.precision).stem}"
        if args.rotate:  # built-in Hadamard rotations (sfc build --rotate): a row of its own
            config["rotate"] = tuple(args.rotate)
            name = f"{name}+rot-" + "-".join(args.rotate)
        if args.seed:  # the build seed (the rotation's signs, the one-stage draws)
            config["seed"] = args.seed
            name = f"{name}@seed{args.seed}"
        search = config.get("search")
        if args.train_device and search is not None and search.method == "one-stage":
            config["search"] = replace(search, one_stage=replace(search.one_stage,
                                                                 device=args.train_device))
            name = f"{name}@{args.train_device}"
        if args.train_data:  # more training audio for learned variants: a row of its own
            config["train_data"] = tuple(Path(d).resolve() for d in args.train_data)
            name = f"{name}+" + "+".join(d.name for d in config["train_data"])
        if name in results.get("variants", {}):
            continue
        out = work / args.model / name
        if args.sensitivity_samples and "search" in config:
            config["search"] = replace(config["search"], samples=args.sensitivity_samples)
        row = build_variant(args.model, out, config, BUNDLED_DATA / "eval",
                            calib_limit=None, eval_limit=args.eval_limit, threads=args.threads)
        row["avg_bits"] = avg_bits(out)
        precision = out / "precision.json"
        if precision.is_file():
            found = json.loads(precision.read_text())
            row["search"] = {k: v for k, v in found.items() if k != "layers"}
            row["chosen"] = _chosen(found)
        # Per-utterance word errors stay: two variants can then be compared paired.
        for key in ("hypotheses", "substitutions", "deletions", "insertions",
                    "compute_s", "loop_stops"):
            row.pop(key, None)
        results.setdefault("variants", {})[name] = row
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        print(f"{name}: WER delta {100 * row['wer']['delta']:+.2f}", flush=True)
    show(results)
    return 0


def show(results: dict[str, Any]) -> None:
    rows = []
    for name, r in results.get("variants", {}).items():
        w = r["wer"]
        rows.append([name, f"{r['avg_bits']:.2f}", f"{r['size_bytes'] / 1e6:.1f}",
                     f"{100 * w['wer']:.2f}",
                     f"{100 * w['delta']:+.2f} [{100 * w['delta_lo']:+.2f}, "
                     f"{100 * w['delta_hi']:+.2f}]",
                     "yes" if w["lossless"] else "no", str(r["eval"]["loop_stops"])])
    print(machine_line(results["machine"]))
    print_table("sub-8-bit weights", ["variant", "avg bits", "MB", "WER %", "dWER [95% CI]",
                                      "lossless", "loops"], rows)


def _group(graph: str, consumers: list[str]) -> str:
    """A layer's kind: embedding/logits table, conv, cross-attention K/V, fc1, fc2, ..."""
    name = consumers[0]
    if len(consumers) > 1 or name.startswith("/MatMul"):
        return "logits/embedding table"
    for key in ("conv", "fc1", "fc2", "out_proj", "q_proj", "k_proj", "v_proj"):
        if key in name:
            kind = key
            break
    else:
        kind = name
    if graph == "encoder" and kind in ("k_proj", "v_proj") and "layers." not in name:
        return "encoder: cross-attention K/V"
    return f"{graph}: {kind}"


def _chosen(precision: dict[str, Any]) -> dict[str, str]:
    """"graph:tensor" -> the format a search chose (precision.json's layers)."""
    return {f"{c['graph']}:{c['tensor']}": c["chosen"] for c in precision["layers"]}


def compare(paths: list[Path]) -> None:
    """Per-layer formats of two or more mixed builds side by side (precision.json each),
    then the count of each format by kind of layer."""
    found = [json.loads(p.read_text()) for p in paths]
    heads = [f"{f['config'].get('method', 'two-stage')} {f['avg_bits']:.2f}" for f in found]
    first = found[0]["layers"]
    choices = [_chosen(f) for f in found]
    rows, kinds = [], {}
    for c in first:
        key = f"{c['graph']}:{c['tensor']}"
        labels = [ch.get(key, "-") for ch in choices]
        rows.append([", ".join(c["consumers"])[:40], c["graph"], f"{c['params']:,}", *labels])
        kind = kinds.setdefault(_group(c["graph"], c["consumers"]),
                                [dict() for _ in found])
        for counts, label in zip(kind, labels, strict=True):
            counts[label] = counts.get(label, 0) + 1
    print_table("chosen format per weight", ["weight", "graph", "params", *heads], rows)
    print_table("formats by kind", ["kind", *heads],
                [[k, *(" ".join(f"{n}x{lab}" for lab, n in sorted(c.items())) for c in v)]
                 for k, v in sorted(kinds.items())])


def layers(path: Path, fmt: str) -> None:
    """Which weights carry the loss at `fmt`: the probes of a mixed build's precision.json."""
    result = json.loads(path.read_text())
    rows, groups = [], {}
    for c in result["layers"]:
        sens = {o["label"]: o["sensitivity"] for o in c["options"]}
        if fmt not in sens:
            continue
        g = _group(c["graph"], c["consumers"])
        groups[g] = groups.get(g, 0.0) + sens[fmt]
        rows.append((sens[fmt], c["graph"], ", ".join(c["consumers"]), c["params"]))
    total = sum(groups.values())
    print(f"{result['objective']} increase when one weight alone is {fmt} "
          f"({result['config']['samples']} calibration items, FP32 "
          f"{result['fp32_objective']:.4g}); sum over weights {total:.4g}")
    print_table(f"weights by {fmt} sensitivity (top 12)", ["weight", "graph", "params",
                                                            "sensitivity", "share"],
                [[n, g, f"{p:,}", f"{v:.4g}", f"{100 * v / total:.1f}%"]
                 for v, g, n, p in sorted(rows, reverse=True)[:12]])
    print_table(f"by kind at {fmt}", ["kind", "sensitivity", "share"],
                [[k, f"{v:.4g}", f"{100 * v / total:.1f}%"]
                 for k, v in sorted(groups.items(), key=lambda kv: -kv[1])])


def _per_utterance(ref: str) -> tuple[list[int], list[int]]:
    """(errors, reference words) per utterance of RESULTS_JSON:VARIANT (this script's
    rows keep per-utterance errors from commit 8f8933d on; the eval set's words) or of
    an `sfc eval --json` file (any set)."""
    if Path(ref).is_file():
        utterances = json.loads(Path(ref).read_text())["_data"]["utterances"]
        return ([u["substitutions"] + u["deletions"] + u["insertions"] for u in utterances],
                [u["ref_words"] for u in utterances])
    path, _, name = ref.rpartition(":")
    found = json.loads(Path(path).read_text())["variants"].get(name)
    if found is None or "errors" not in found:
        raise SystemExit(f"{ref}: no such variant with per-utterance errors")
    return found["errors"], [count_errors(u.text, "").ref_words
                             for u in read_manifest(BUNDLED_DATA / "eval")]


def _mean_errors(refs: str) -> tuple[list[float], list[int]]:
    """Per-utterance errors averaged over the comma-separated builds of `refs` (builds of
    one method on several calibration sets or seeds), with the set's reference words."""
    rows = [_per_utterance(r) for r in refs.split(",")]
    if any(words != rows[0][1] for _, words in rows):
        raise SystemExit(f"{refs}: not results on the same utterances")
    return [sum(e) / len(e) for e in zip(*(e for e, _ in rows), strict=True)], rows[0][1]


def paired(a: str, b: str) -> None:
    """WER(b) - WER(a) with its paired 95% CI over the utterances; each of `a`, `b` is
    RESULTS_JSON:VARIANT or an `sfc eval --json` file, both of the same set, or several
    of them joined by commas (their per-utterance errors averaged: a method's effect over
    calibration sets, the utterances still the unit resampled)."""
    (errors_a, words), (errors_b, words_b) = _mean_errors(a), _mean_errors(b)
    if words != words_b:
        raise SystemExit(f"{a} and {b} are not results on the same utterances")
    d = paired_bootstrap_delta(errors_a, errors_b, words)
    print(f"{b} - {a}: {100 * d.delta:+.2f} [{100 * d.lo:+.2f}, {100 * d.hi:+.2f}] "
          f"WER points, p = {d.p_value:.3g}, {len(words)} utterances")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="whisper-tiny.en")
    parser.add_argument("--variants", default=None, help="comma-separated (default all)")
    parser.add_argument("--work", default="/tmp/sfc-lowbit")
    parser.add_argument("--json", default=None)
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--calib", default=None,
                        help="calibration manifest folder instead of the bundled one")
    parser.add_argument("--precision", default=None, metavar="MAP_JSON",
                        help="a --precision map applied to the variants (benchmarks/"
                        "resolve_mix.py writes one from a search)")
    parser.add_argument("--rotate", nargs="+", default=None, metavar="GRAPH",
                        help="Hadamard-rotate these graphs' MatMul inputs (sfc build --rotate)")
    parser.add_argument("--seed", type=int, default=0,
                        help="build seed (a row of its own when not 0)")
    parser.add_argument("--train-device", default=None, choices=("cpu", "cuda"),
                        help="where one-stage variants train (a row of its own: NAME@DEVICE)")
    parser.add_argument("--train-data", nargs="+", default=None, metavar="MANIFEST_DIR",
                        help="more training audio for one-stage / fine-tuning variants "
                        "(`sfc synth` writes some)")
    parser.add_argument("--sensitivity-samples", type=int, default=None,
                        help="calibration items for the mixed variants' probes (default 16)")
    parser.add_argument("--show", action="store_true")
    parser.add_argument("--layers", metavar="PRECISION_JSON",
                        help="print which weights carry the loss (a mixed build's probes)")
    parser.add_argument("--format", default="4/32", help="the format --layers ranks by")
    parser.add_argument("--compare", nargs="+", metavar="PRECISION_JSON",
                        help="per-layer formats of mixed builds side by side")
    parser.add_argument("--paired", nargs=2, metavar="JSON:VARIANT|EVAL_JSON",
                        help="the paired WER difference of two variants' rows (B - A); "
                        "A,A2 averages builds per utterance")
    args = parser.parse_args()
    if args.paired:
        paired(*args.paired)
        return 0
    if args.compare:
        compare([Path(p) for p in args.compare])
        return 0
    if args.layers:
        layers(Path(args.layers), args.format)
        return 0
    args.json = args.json or str(REPO / "benchmarks" / "results" /
                                 f"lowbit_{args.model}.json")
    return run_or_show(args, run, show)


if __name__ == "__main__":
    sys.exit(main())
