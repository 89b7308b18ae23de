"""Solve a finished two-stage search's integer program again, with formats forbidden.

    python benchmarks/resolve_mix.py BUILD/precision.json --forbid 'decoder:*=2/32' \
        --forbid 'encoder:/[kv]_proj*=2/32' -o map.json

Reads the probes' sensitivities that a `--weights mixed` build saved (precision.json),
drops the options a `--forbid GRAPH:NODE_GLOB=FORMAT` matches (node globs are matched on
each weight's consumers), solves the same program under the same budget, prints the
predicted objective next to the build's own choice, and writes the choice as a
`--precision` map with graph-qualified exact node names, so `sfc build --weights 4
--precision map.json` builds that mix without probing again. Why: to test a constraint
(no 2-bit weight in the decoder, say) against WER without hours of probes.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from sfc.precision.budget import WeightOption
from sfc.precision.solve import solve_choice
from sfc.quant.plan import exact_pattern


def _forbidden(layer: dict[str, Any], label: str, rules: list[tuple[str, str]]) -> bool:
    return any(label == fmt and any(fnmatch.fnmatchcase(f"{layer['graph']}:{c}", glob)
                                    for c in layer["consumers"]) for glob, fmt in rules)


def resolve(found: dict[str, Any], rules: list[tuple[str, str]]
            ) -> tuple[dict[str, str], float]:
    """(graph:tensor -> chosen label, predicted objective) under the forbidding rules."""
    options: dict[str, list[WeightOption]] = {}
    labels: dict[str, list[str]] = {}
    for layer in found["layers"]:
        key = f"{layer['graph']}:{layer['tensor']}"
        kept = [o for o in layer["options"] if not _forbidden(layer, o["label"], rules)]
        if not kept:
            raise SystemExit(f"{key}: every format is forbidden")
        options[key] = [WeightOption(None, o["bits"], o["sensitivity"]) for o in kept]
        labels[key] = [o["label"] for o in kept]
    picked = solve_choice(options, found["bits_allowed"])
    return ({k: labels[k][i] for k, i in picked.items()},
            sum(options[k][i].sensitivity for k, i in picked.items()))


def as_map(found: dict[str, Any], chosen: dict[str, str]) -> dict[str, Any]:
    """The `--precision` map that builds exactly `chosen`."""
    out: dict[str, Any] = {}
    for layer in found["layers"]:
        label = chosen[f"{layer['graph']}:{layer['tensor']}"]
        bits, _, block = label.partition("/")
        value: Any = ({"weights": int(bits), "block_size": int(block)} if block
                      else label if label == "float" else int(bits))
        for node in layer["consumers"]:
            out[f"{layer['graph']}:{exact_pattern(node)}"] = value
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("precision", type=Path, help="a mixed build's precision.json")
    ap.add_argument("--forbid", action="append", default=[], metavar="GRAPH:GLOB=FORMAT")
    ap.add_argument("-o", "--out", type=Path, help="write the choice as a precision map")
    args = ap.parse_args(argv)
    found = json.loads(args.precision.read_text())
    rules = []
    for text in args.forbid:
        glob, sep, fmt = text.rpartition("=")
        if not sep or not glob:
            raise SystemExit(f"--forbid {text!r}: expected GRAPH:GLOB=FORMAT")
        rules.append((glob, fmt))
    layers = found["layers"]
    built = {f"{x['graph']}:{x['tensor']}": x["chosen"] for x in layers}
    built_pred = sum(next(o["sensitivity"] for o in x["options"] if o["label"] == x["chosen"])
                     for x in layers)
    chosen, predicted = resolve(found, rules)
    for name, choice, pred in (("the build's choice", built, built_pred),
                               ("with the rules", chosen, predicted)):
        counts = Counter((k.split(":", 1)[0], v) for k, v in choice.items())
        print(f"{name}: predicted objective {pred:.4f};",
              ", ".join(f"{g} {lab} x{n}" for (g, lab), n in sorted(counts.items())))
    if args.out:
        args.out.write_text(json.dumps(as_map(found, chosen), indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
