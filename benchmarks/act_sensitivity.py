"""Which activation quantizers of a W8A8 build carry its loss (leave-one-out probes).

    python benchmarks/act_sensitivity.py BUILD --model whisper-base [--samples 16]
        [--guard-kl 0.02 --guard-max 8 --recipes OUT]

Loads the build's FP32 graphs and recipes, makes every quantized activation switchable
(`sfc.precision.activations`) and measures the KL to FP32 (teacher-forced on the FP32
model's own transcripts of the first `--samples` calibration clips) with all activations
quantized, with none, and with each one alone left in float. Writes BUILD/act_probes.json
(resumable through BUILD/act_probes.ckpt.json) and prints the largest gains.

With `--recipes OUT` it also runs the build's activation guard on those probes
(`guard_activations` on the clips `guard_clips` picks, as `sfc build` does after
calibration) and writes the
build's recipes without the activations it keeps float to OUT/<graph>/recipe.json, so
`sfc build MODEL --recipe OUT` gives what a build of an unguarded recipe would have become,
without calibrating again.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

import onnx

from sfc.calib.esc import split_key
from sfc.calib.objectives import GraphSetup, make_objective
from sfc.card import ModelCard
from sfc.eval.manifest import read_manifest
from sfc.models import model_folder
from sfc.paths import BUNDLED_DATA
from sfc.precision.activations import (
    GuardConfig,
    gate_activations,
    gate_name,
    guard_activations,
    guard_clips,
    probe_activations,
)
from sfc.quant.recipe import Recipe
from sfc.quant.stored import STORED_FILE, StoredWeights
from sfc.runtime.whisper import WhisperRuntime
from sfc.targets import get_target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", type=Path)
    parser.add_argument("--model", required=True)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--skip", type=int, default=16,
                        help="calibration clips to skip (the build's ESC samples)")
    parser.add_argument("--guard-kl", type=float, default=GuardConfig().allowance)
    parser.add_argument("--guard-max", type=int, default=GuardConfig().max_float)
    parser.add_argument("--recipes", type=Path)
    parser.add_argument("--guard-only", action="store_true",
                        help="only what the guard measures (no probes when within the allowance)")
    args = parser.parse_args()
    fp32 = model_folder(args.model)
    card = ModelCard.load(fp32)
    setups, tensors = {}, {}
    target = None
    for graph in ("encoder", "decoder"):
        folder = args.build / graph
        recipe = Recipe.load(folder / "recipe.json")
        target = recipe.config.get("target", "ort-cpu")
        stored = (StoredWeights.load(folder / STORED_FILE, recipe.weight_data)
                  if recipe.weight_data else None)
        acts = tuple(t.tensor for t in recipe.tensors if t.kind == "activation")
        tensors[graph] = acts

        def rewrite(m: onnx.ModelProto, acts: tuple[str, ...] = acts) -> onnx.ModelProto:
            return gate_activations(m, acts)

        setups[graph] = GraphSetup(onnx.load(str(folder / "model.fp32.onnx")), recipe, (),
                                   tuple(gate_name(t) for t in acts), stored, rewrite)
    runtime = WhisperRuntime.open(fp32)
    utterances = read_manifest(BUNDLED_DATA / "calib")
    clips = guard_clips(len(utterances), args.skip, args.samples)
    objective = make_objective("kl", card, setups, samples=len(clips), runtime=runtime,
                               utterances=utterances[clips.start:clips.stop],
                               optimization=get_target(str(target)).optimization)
    checkpoint = args.build / "act_probes.ckpt.json"
    key = json.dumps([clips.start, clips.stop])
    try:
        if not args.guard_only:
            probes = probe_activations(objective, tensors, checkpoint, key=key)
            (args.build / "act_probes.json").write_text(json.dumps(probes.to_dict(), indent=1))
            for k, gain in probes.ranked()[:15]:
                print(f"  {gain:+.4f}  {k}")
        guard = guard_activations(objective, tensors, GuardConfig(
            args.guard_kl, args.guard_max, args.samples), checkpoint, key)
    finally:
        objective.close()
    print(f"KL all quantized {guard.quantized:.4f}, all float {guard.float_:.4f}")
    print(f"guard at {args.guard_kl}: keeps {len(guard.kept)} float, KL "
          f"{guard.final:.4f} (met: {guard.met})")
    for k, after in zip(guard.kept, guard.steps, strict=True):
        print(f"  {after:.4f} after {k}")
    if args.recipes is not None:
        for graph in tensors:
            recipe = Recipe.load(args.build / graph / "recipe.json")
            kept = {t for g, t in map(split_key, guard.kept) if g == graph}
            out = args.recipes / graph
            out.mkdir(parents=True, exist_ok=True)
            replace(recipe, tensors=tuple(t for t in recipe.tensors if t.tensor not in kept)
                    ).save(out / "recipe.json")
            if recipe.weight_data:
                shutil.copyfile(args.build / graph / STORED_FILE, out / STORED_FILE)
        (args.recipes / "act_guard.json").write_text(json.dumps(guard.to_dict(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
