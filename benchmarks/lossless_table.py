"""Is a build configuration lossless? Paired WER intervals per build seed and evaluation set.

Issue 15 (item 5): "lossless" means the paired 95% interval of WER(build) - WER(FP32)
contains 0 for each of 3 build seeds, on `calibration_data/eval` and on a second set the
build never saw (`benchmarks/heldout_set.py`: new sentences, hibari's heart voice). This
script builds one configuration (`sfc build MODEL --seed K --no-eval EXTRA...`) for each
seed, evaluates every build and the FP32 export on both sets (`sfc eval --json`), and pairs
them per clip with `sfc.report.compare_wer` (sfc's paired bootstrap, seed 0, 2000
resamples): a (seed, set) cell is lossless when its interval contains 0, the configuration
when every cell is.

`--compare OTHER` adds the paired interval of WER(this) - WER(OTHER) per seed and set from
OTHER's evaluations in the same `--work` folder (e.g. ESC against MSE on the same clips).
`--builds-of OTHER --eval-arg=...` evaluates OTHER's builds again with other `sfc eval`
options (a runtime option such as `--encoder-window fit`), still against FP32 as exported
with the default options: the question is then whether the option keeps the builds lossless.

Runs are long, so every step is resumable: a build folder holding `report.json` and an
evaluation JSON that exists (filed under its set's digest, so a re-rendered set is
evaluated again) are reused. Builds whose recipes equal seed 0's once the recorded seed is
set aside (a configuration that draws no random number, e.g. MSE
calibration) are not repeated: after the second seed matches the first, the remaining
seeds are recorded as `same_recipe_as` the first seed and share its evaluations.

    python benchmarks/lossless_table.py default
    python benchmarks/lossless_table.py mse --compare default -- --calibrator mse
    python benchmarks/lossless_table.py esc100 --compare default -- --esc-samples 100
    python benchmarks/lossless_table.py default-fit --builds-of default \
        --eval-arg=--encoder-window --eval-arg=fit --compare default
    python benchmarks/lossless_table.py default --show

Writes `benchmarks/results/lossless_NAME.json`; builds and evaluations go under `--work`
(default /tmp/lossless), outside git.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import machine_info, machine_line, outside_repo, print_table, run_or_show
from heldout_set import default_out as heldout_default

from sfc.atomic import write_json_atomic
from sfc.eval.results import EvalResult
from sfc.report import WerComparison, compare_wer

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
EVAL_SET = REPO / "calibration_data" / "eval"


@dataclass(frozen=True)
class Cell:
    """One (seed, set) pairing: WER of both systems and the paired interval of B - A."""

    seed: int
    set: str
    n: int
    wer_a: float
    wer_b: float
    delta: float
    lo: float
    hi: float
    p_value: float
    includes_zero: bool

    @classmethod
    def of(cls, seed: int, name: str, cmp: WerComparison) -> Cell:
        return cls(seed, name, cmp.n, cmp.fp32_wer, cmp.wer, cmp.delta, cmp.delta_lo,
                   cmp.delta_hi, cmp.p_value, cmp.lossless)


def cells(reference: Mapping[tuple[int, str], EvalResult],
          built: Mapping[tuple[int, str], EvalResult]) -> list[Cell]:
    """Paired cells of `built` against `reference`, over the (seed, set) keys they share,
    sorted by seed then set."""
    keys = sorted(set(reference) & set(built))
    return [Cell.of(seed, name, compare_wer(reference[(seed, name)], built[(seed, name)]))
            for seed, name in keys]


def verdict(table: Sequence[Cell]) -> bool | None:
    """True when every cell's interval contains 0, False when one does not, None if empty."""
    return all(c.includes_zero for c in table) if table else None


def recipe_key(folder: Path) -> dict[str, Any]:
    """Every graph's recipe.json with the recorded seed set aside, by graph name."""
    out = {}
    for path in sorted(folder.glob("*/recipe.json")):
        envelope = json.loads(path.read_text())
        data = dict(envelope.get("_data", envelope))
        data.pop("seed", None)
        out[path.parent.name] = data
    return out


def format_cell(c: Cell) -> str:
    """`+0.12 [-0.30, +0.55] yes`: ΔWER in points with its interval and the verdict."""
    return (f"{100 * c.delta:+.2f} [{100 * c.lo:+.2f}, {100 * c.hi:+.2f}] "
            f"{'yes' if c.includes_zero else 'NO'}")


def table_rows(table: Sequence[Cell], sets: Sequence[str],
               same_as: Mapping[int, int]) -> list[list[str]]:
    """One row per seed: the seed (noting a shared recipe), then one cell per set."""
    by_key = {(c.seed, c.set): c for c in table}
    rows = []
    for seed in sorted({c.seed for c in table}):
        label = str(seed) if seed not in same_as else f"{seed} (= seed {same_as[seed]})"
        rows.append([label] + [format_cell(by_key[(seed, s)]) if (seed, s) in by_key else "-"
                               for s in sets])
    return rows


def _run(cmd: Sequence[str], log: Path) -> None:
    print("$", shlex.join(cmd), flush=True)
    with log.open("w") as f:
        proc = subprocess.run(list(cmd), stdout=f, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        sys.exit(f"failed (exit {proc.returncode}), see {log}")


def build(model: str, folder: Path, seed: int, extra: Sequence[str],
          threads: int | None) -> float:
    """Build into `folder` unless it holds a finished build; its build seconds."""
    if not (folder / "report.json").is_file():
        cmd = ["sfc", "build", model, "-o", str(folder), "--seed", str(seed), "--no-eval",
               *(["--threads", str(threads)] if threads else []), *extra]
        folder.parent.mkdir(parents=True, exist_ok=True)
        _run(cmd, folder.parent / f"{folder.name}.build.log")
    return float(json.loads((folder / "report.json").read_text())["_data"]["build_s"])


def evaluate(model: str, data: Path, out: Path, limit: int | None,
             threads: int | None, extra: Sequence[str] = ()) -> EvalResult:
    """`sfc eval` of `model` on `data` into `out`, unless `out` exists."""
    if not out.is_file():
        cmd = ["sfc", "eval", model, "--data", str(data), "--json", str(out),
               *(["--limit", str(limit)] if limit else []),
               *(["--threads", str(threads)] if threads else []), *extra]
        _run(cmd, out.with_suffix(".log"))
    return EvalResult.load(out)


def set_digest(folder: Path) -> str:
    """12 hex digits of the sha256 of an evaluation set's files (names and bytes).

    Evaluations are kept per digest: a set rendered again (another CPU class can give other
    audio) is never paired with results on the old audio."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f.relative_to(folder).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def run(args: argparse.Namespace) -> int:
    work = outside_repo(args.parser, args.work, REPO)
    sets = {"eval": EVAL_SET.resolve(), "heldout": args.heldout.resolve()}
    if not (sets["heldout"] / "manifest.jsonl").is_file():
        sys.exit(f"no held-out set at {sets['heldout']}: run benchmarks/heldout_set.py first")
    evals = work / "evals"
    evals.mkdir(parents=True, exist_ok=True)
    suffix = f"-n{args.limit}" if args.limit else ""
    digests = {name: set_digest(path) for name, path in sets.items()}

    def eval_of(label: str, model: str, name: str, extra: Sequence[str] = ()) -> EvalResult:
        return evaluate(model, sets[name], evals / f"{label}-{name}-{digests[name]}{suffix}.json",
                        args.limit, args.threads, extra)

    fp32 = {name: eval_of("fp32", args.model, name) for name in sets}
    builds_of = args.builds_of or args.name
    built: dict[tuple[int, str], EvalResult] = {}
    same_as: dict[int, int] = {}
    build_s: dict[int, float] = {}
    first = args.seeds[0]
    for i, seed in enumerate(args.seeds):
        if i >= 2 and same_as.get(args.seeds[1]) == first:
            same_as[seed] = first  # seed 1 matched seed 0: the seed changes nothing
        else:
            folder = work / "builds" / builds_of / f"seed{seed}"
            if args.builds_of and not (folder / "report.json").is_file():
                sys.exit(f"no finished build of {args.builds_of} at {folder}")
            build_s[seed] = build(args.model, folder, seed, args.build_args, args.threads)
            if i == 1 and recipe_key(folder) == recipe_key(folder.with_name(f"seed{first}")):
                same_as[seed] = first
        label = f"{args.name}-seed{same_as.get(seed, seed)}"
        folder = work / "builds" / builds_of / f"seed{same_as.get(seed, seed)}"
        for name in sets:
            built[(seed, name)] = eval_of(label, str(folder), name, args.eval_args)
    reference = {(seed, name): fp32[name] for seed in args.seeds for name in sets}
    table = cells(reference, built)
    comparisons = {}
    for other in args.compare:
        # OTHER's seeds that shared a recipe were evaluated once, under the first seed.
        saved = Path(args.json).with_name(f"lossless_{other}.json")
        shared = {s["seed"]: s["same_recipe_as"] for s in json.loads(saved.read_text())["seeds"]
                  if s["same_recipe_as"] is not None} if saved.is_file() else {}
        theirs = {(seed, name): EvalResult.load(p) for seed in args.seeds for name in sets
                  if (p := evals / f"{other}-seed{shared.get(seed, seed)}-{name}"
                      f"-{digests[name]}{suffix}.json").is_file()}
        comparisons[other] = [asdict(c) for c in cells(theirs, built)]
    report = {
        "name": args.name, "model": args.model, "build_args": list(args.build_args),
        "builds_of": builds_of, "eval_args": list(args.eval_args),
        "command": shlex.join(sys.argv), "machine": machine_info(args.threads or 0),
        "sets": {name: {"data": str(path), "digest": digests[name], "n": fp32[name].n,
                        "ref_words": sum(u.ref_words for u in fp32[name].utterances)}
                 for name, path in sets.items()},
        "fp32": {name: {"wer": r.wer, "errors": [u.errors for u in r.utterances]}
                 for name, r in fp32.items()},
        "seeds": [{"seed": s, "same_recipe_as": same_as.get(s), "build_s": build_s.get(s),
                   "errors": {name: [u.errors for u in built[(s, name)].utterances]
                              for name in sets}} for s in args.seeds],
        "cells": [asdict(c) for c in table], "lossless": verdict(table),
        "comparisons": comparisons, "limit": args.limit, "written": time.strftime("%Y-%m-%d"),
    }
    write_json_atomic(Path(args.json), report)
    show(report)
    return 0


def show(report: dict[str, Any]) -> None:
    sets = list(report["sets"])
    same_as = {s["seed"]: s["same_recipe_as"] for s in report["seeds"]
               if s["same_recipe_as"] is not None}
    print(machine_line(report["machine"]))
    fp32 = ", ".join(f"{n} {100 * report['fp32'][n]['wer']:.2f}% (n={report['sets'][n]['n']})"
                     for n in sets)
    headers = ["seed"] + [f"{n}: ΔWER pts [95% CI] lossless" for n in sets]
    table = [Cell(**c) for c in report["cells"]]
    evaluated = (f", builds of {report['builds_of']} evaluated with "
                 f"{shlex.join(report['eval_args'])}" if report.get("eval_args") else "")
    print_table(f"{report['name']}: {report['model']} {shlex.join(report['build_args'])}"
                f"{evaluated} vs FP32", headers, table_rows(table, sets, same_as),
                f"FP32 WER: {fp32}. Lossless everywhere: {report['lossless']}.")
    for other, raw in report["comparisons"].items():
        cmp = [Cell(**c) for c in raw]
        # Here "yes" reads "no significant difference": the interval contains 0.
        print_table(f"{report['name']} - {other} (paired, same clips)",
                    ["seed"] + [f"{n}: ΔWER pts [95% CI] contains 0" for n in sets],
                    table_rows(cmp, sets, same_as))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, build_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) \
        if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="configuration name (results/lossless_NAME.json)")
    parser.add_argument("--model", default="whisper-tiny.en")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--heldout", type=Path, default=heldout_default())
    parser.add_argument("--work", type=Path, default=Path("/tmp/lossless"))
    parser.add_argument("--compare", action="append", default=[],
                        help="another configuration run in the same --work (repeatable)")
    parser.add_argument("--builds-of", default=None,
                        help="evaluate these builds (same --work) instead of building")
    parser.add_argument("--eval-arg", dest="eval_args", action="append", default=[],
                        help="an option for `sfc eval` of the builds, not of FP32 (repeatable)")
    parser.add_argument("--limit", type=int, default=None, help="first N clips of each set")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="default results/lossless_NAME.json")
    parser.add_argument("--show", action="store_true", help="print the saved JSON only")
    args = parser.parse_args(own)
    args.build_args, args.parser = build_args, parser
    if args.builds_of and build_args:
        parser.error("--builds-of evaluates finished builds: no build options after --")
    args.json = args.json or str(RESULTS / f"lossless_{args.name}.json")
    return run_or_show(args, run, show)


if __name__ == "__main__":
    sys.exit(main())
