"""How the one-stage search's wall time grows with model size and training audio.

    python benchmarks/onestage_time.py [--steps 4] [--rounds 1]
    python benchmarks/onestage_time.py --show

Each case is a separate `sfc build --weights mixed --search one-stage` process (4.5 average
bits, weight-only, no evaluation) with a few search and fine-tuning steps; cases run one
after another, interleaved over rounds, each round with its own seed so no run resumes a
checkpoint of another. From each build's precision.json: seconds per search step and per
fine-tuning step (4 clips each), the teacher's transcripts per training clip, and fixing
the bits (the integer program and GPTQ at the chosen formats). A step's cost does not
depend on how much audio there is; the data's size enters through the transcripts and
through how many steps it takes to see it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import machine_info, machine_line, outside_repo, print_table, run_or_show

REPO = Path(__file__).resolve().parents[1]
CASES = (("whisper-tiny.en", 8), ("whisper-tiny.en", 32), ("whisper-base", 8))


def _build(model: str, clips: int, steps: int, seed: int, out: Path) -> dict[str, Any]:
    argv = ["sfc", "build", model, "-o", str(out), "--weights", "mixed", "--avg-bits", "4.5",
            "--search", "one-stage", "--search-steps", str(steps), "--finetune-steps",
            str(steps), "--calib-limit", str(clips), "--activations", "none", "--no-eval",
            "--seed", str(seed)]
    code = f"import sys\nfrom sfc.cli import main\nsys.argv = {argv!r}\nmain()"
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ.copy(),
                   stdout=subprocess.DEVNULL)
    found = json.loads((out / "precision.json").read_text())
    phases = found["phase_seconds"]
    augment = found["config"]["one_stage"]["augment"]
    return {"search_s_per_step": phases["search"] / steps,
            "finetune_s_per_step": phases["fine-tuning"] / steps,
            "fix_s": phases["fixing bits"],
            "transcripts_s_per_clip": phases["teacher transcripts"] / clips,
            "training_clips": clips * (1 + augment)}


def run(args: argparse.Namespace) -> int:
    work = outside_repo(argparse.ArgumentParser(), Path(args.work), REPO)
    rows: dict[str, list[dict[str, Any]]] = {}
    for r in range(args.rounds):
        for model, clips in CASES:
            name = f"{model} {clips} clips"
            print(f"round {r + 1}: {name}", flush=True)
            rows.setdefault(name, []).append(
                _build(model, clips, args.steps, 1000 + r, work / f"{model}-{clips}-{r}"))
    summary = {name: {k: statistics.median(x[k] for x in runs) for k in runs[0]}
               for name, runs in rows.items()}
    result = {"machine": machine_info(0), "steps": args.steps, "rounds": args.rounds,
              "cases": summary, "runs": rows}
    Path(args.json).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    show(result)
    return 0


def show(result: dict[str, Any]) -> None:
    print(machine_line(result["machine"]))
    print_table(f"one-stage wall time ({result['steps']} + {result['steps']} steps, median of "
                f"{result['rounds']} round(s))",
                ["case", "training clips", "s / search step", "s / fine-tuning step",
                 "fixing bits s", "transcripts s / clip"],
                [[name, str(c["training_clips"]), f"{c['search_s_per_step']:.1f}",
                  f"{c['finetune_s_per_step']:.1f}", f"{c['fix_s']:.1f}",
                  f"{c['transcripts_s_per_clip']:.2f}"]
                 for name, c in result["cases"].items()])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--work", default="/tmp/sfc-onestage-time")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" /
                                              "onestage_time.json"))
    parser.add_argument("--show", action="store_true")
    args = parser.parse_args()
    return run_or_show(args, run, show)


if __name__ == "__main__":
    sys.exit(main())
