"""FP16-float against FP32-float TensorRT-ready Whisper graphs, both run on ONNX Runtime CPU.

    python benchmarks/trt_float_wer.py [--build DIR] [--work /tmp/trtfloat] [--limit N]
    python benchmarks/trt_float_wer.py --show

Without --build, `sfc build --target tensorrt:10.16` with sfc's default W8A8 recipe (ESC,
activation guard) goes into WORK/build (reused when its card is there). The build's QDQ
graphs are lowered by the tensorrt target twice, with FP32 and with FP16 float layers, into
WORK/fp32 and WORK/fp16, each a folder whose card runs the TensorRT-ready ONNX on ONNX
Runtime CPU. A build with the INT2 plugin (TensorRT-only nodes) is refused.

ONNX Runtime's CPU kernels are FP32 and it skips the FP16 rounding between its own casts,
so the FP16 graph is evaluated with `with_cpu_rounding` (every FP16 value stored in FP16, as
on a GPU); both folders open their graphs with optimization level "none", which that needs.
Both are judged on the same utterances; the paired bootstrap gives WER(fp16) - WER(fp32).
Results: benchmarks/results/trt_float_wer.json (per-utterance errors included).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import onnx
from common import (
    eval_summary,
    machine_info,
    machine_line,
    outside_repo,
    per_utterance,
    run_or_show,
)

from sfc.atomic import write_json_atomic
from sfc.card import ModelCard
from sfc.eval import evaluate, paired_bootstrap_delta, read_manifest
from sfc.paths import BUNDLED_DATA
from sfc.targets import TensorRTTarget
from sfc.targets.tensorrt import TRT_ONNX
from sfc.targets.tensorrt_plan import TrtVersion, plugins_in
from sfc.targets.trt_float import with_cpu_rounding

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "trt_float_wer.json"
VERSION = "10.16"
CPU_ONNX = "model.cpu.onnx"  # the FP16 graph with the rounding ORT CPU would skip


def build_folder(model: str, out: Path) -> Path:
    """sfc's default build for TensorRT (W8A8, ESC) into `out`, unless one is there."""
    from sfc.build import BuildConfig, build

    if not (out / "card.json").is_file():
        build(model, out, BuildConfig(target=f"tensorrt:{VERSION}"))
    return out


def ort_fallbacks(path: Path) -> dict[str, int]:
    """Op types ONNX Runtime CPU runs in FP32 (fed by casts it inserts) in an FP16 graph."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    inserted = {o for n in optimized.graph.node if n.name.startswith("Inserted")
                for o in n.output}
    return dict(collections.Counter(
        n.op_type for n in optimized.graph.node
        if not n.name.startswith("Inserted") and inserted.intersection(n.input)))


def lower_variant(build: Path, out: Path, float_type: str) -> dict[str, Any]:
    """The build's graphs lowered with `float_type` float layers into a runnable folder."""
    card = ModelCard.load(build)
    graphs, notes, fallbacks = {}, {}, {}
    for name, spec in card.graphs.items():
        target = TensorRTTarget(version=TrtVersion.parse(VERSION), float_type=float_type)
        lowering = target.for_graph(card, name).lower(build / name / "model.qdq.onnx", out / name)
        ready = onnx.load(str(out / name / TRT_ONNX))
        if plugins_in(ready):
            raise SystemExit(f"{build} holds TensorRT-only plugin nodes ({plugins_in(ready)}); "
                             "use a W8A8 or W4 build")
        path = f"{name}/{TRT_ONNX}"
        if float_type == "fp16":
            fallbacks[name] = ort_fallbacks(out / name / TRT_ONNX)
            onnx.save(with_cpu_rounding(ready), str(out / name / CPU_ONNX))
            path = f"{name}/{CPU_ONNX}"
        graphs[name] = replace(spec, path=path, optimization="none")
        notes[name] = [n for n in lowering.notes if n.startswith("float layers")]
    replace(card, graphs=graphs).save(out)
    shutil.copyfile(build / str(card.tokenizer), out / str(card.tokenizer))
    return {"folder": str(out), "float_notes": notes, "ort_cpu_fp32_ops": fallbacks}


def run(args: argparse.Namespace) -> int:
    from sfc.runtime.whisper import WhisperRuntime

    work = outside_repo(args.parser, args.work, REPO)
    build = Path(args.build).resolve() if args.build else build_folder(args.model,
                                                                       work / "build")
    utterances = read_manifest(args.data)[: args.limit]
    machine = machine_info(args.threads)
    print(machine_line(machine))
    result: dict[str, Any] = {"machine": machine, "build": str(build), "data": str(args.data),
                              "n": len(utterances), "trt_version": VERSION, "variants": {}}
    for float_type in ("fp32", "fp16"):
        variant = lower_variant(build, work / float_type, float_type)
        runtime = WhisperRuntime.open(variant["folder"], threads=args.threads)
        evaluated = evaluate(runtime.transcribe, utterances, model=f"trt-ready {float_type}",
                             data=str(args.data))
        result["variants"][float_type] = {**variant, "eval": eval_summary(evaluated),
                                          **per_utterance(evaluated)}
        result.setdefault("ref_words", [u.ref_words for u in evaluated.utterances])
    a, b = (result["variants"][k] for k in ("fp32", "fp16"))
    delta = paired_bootstrap_delta(a["errors"], b["errors"], result["ref_words"])
    result["paired_fp16_minus_fp32"] = asdict(delta)
    write_json_atomic(Path(args.json), result)
    show(result)
    return 0


def show(result: dict[str, Any]) -> None:
    """Print the saved comparison."""
    print(machine_line(result["machine"]))
    for name, v in result["variants"].items():
        e = v["eval"]
        print(f"{name}: WER {100 * e['wer']:.2f}% [{100 * e['ci_lo']:.2f}, "
              f"{100 * e['ci_hi']:.2f}] RTF {e['rtf']:.3f} loop stops {e['loop_stops']} "
              f"(n={e['n']}); {v['float_notes']}")
        if v["ort_cpu_fp32_ops"]:
            print(f"  ORT CPU runs these FP16 ops in FP32: {v['ort_cpu_fp32_ops']}")
    d = result["paired_fp16_minus_fp32"]
    print(f"paired WER(fp16) - WER(fp32): {100 * d['delta']:+.2f} points, 95% CI "
          f"[{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}], p = {d['p_value']:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", help="an existing tensorrt build folder (else one is built)")
    parser.add_argument("--model", default="whisper-tiny.en")
    parser.add_argument("--work", type=Path, default=Path("/tmp/trtfloat"))
    parser.add_argument("--data", type=Path, default=BUNDLED_DATA / "eval")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=str(RESULTS))
    parser.add_argument("--show", action="store_true")
    args = parser.parse_args()
    args.parser = parser
    return run_or_show(args, run, show)


if __name__ == "__main__":
    sys.exit(main())
