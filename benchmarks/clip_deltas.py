"""Which clips a low-bit build loses words on, and whether other builds lose them on the same
clips (BENCHMARKS.md, issue 10).

    python benchmarks/clip_deltas.py FP32 BUILD [BUILD ...]

FP32 and each BUILD: `lowbit_table.py` RESULTS_JSON:VARIANT or an `sfc eval --json` file, all
on the same set. Per build: its net extra word errors over FP32, how many clips it makes
worse and better, and what its ten worst clips hold; then, for every pair of builds, the
correlation of their per-clip error deltas and how many of their ten worst clips they share.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from lowbit_table import _per_utterance


def main(refs: list[str]) -> int:
    if len(refs) < 2:
        raise SystemExit(__doc__)
    fp32, words = _per_utterance(refs[0])
    deltas = []
    for ref in refs[1:]:
        errors, w = _per_utterance(ref)
        if w != words:
            raise SystemExit(f"{ref} and {refs[0]} are not results on the same utterances")
        deltas.append(np.asarray(errors) - np.asarray(fp32))
    names = [Path(r).name for r in refs[1:]]
    worst = [set(np.argsort(-d, kind="stable")[:10].tolist()) for d in deltas]
    for name, d, top in zip(names, deltas, worst, strict=True):
        print(f"{name}: net {int(d.sum()):+d} word errors, {int((d > 0).sum())} clips worse, "
              f"{int((d < 0).sum())} better, worst ten {int(d[sorted(top)].sum()):+d}")
    corr = np.corrcoef(np.array(deltas)) if len(deltas) > 1 else np.ones((1, 1))
    print("\nper-clip delta correlation / shared worst-ten clips:")
    for i, name in enumerate(names):
        cells = "  ".join(f"{corr[i, j]:5.2f}/{len(worst[i] & worst[j]):2d}"
                          for j in range(len(names)))
        print(f"{i + 1:2d} {cells}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
