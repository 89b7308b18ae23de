"""What fresh memory costs on this machine: filling an array in pages the process has never
held, against filling it again.

    python benchmarks/fresh_pages.py [--mb 92] [--rounds 3]

Each round runs in a new process (so its pages are fresh to it): it allocates `--mb` MB
(above malloc's mmap threshold, so the pages come from the kernel), fills them once, fills
them again, and prints both times. On bare metal the first fill costs a page fault per
4 KiB page (well under a millisecond per MB); a virtual machine that backs guest memory on
first touch, or gives freed pages back to its host, can cost far more, and then every
large temporary array a program makes and frees costs that again. Speed numbers taken on
such a machine say so (BENCHMARKS.md, issue 14).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import time, numpy as np, json, sys
n = int(sys.argv[1]) * 1_000_000 // 4
t = time.perf_counter(); a = np.empty(n, np.float32); a[:] = 1.0; first = time.perf_counter() - t
t = time.perf_counter(); a[:] = 2.0; again = time.perf_counter() - t
print(json.dumps({"first_s": first, "again_s": again}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=92)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for r in range(args.rounds):
        out = subprocess.run([sys.executable, "-c", CHILD, str(args.mb)], check=True,
                             capture_output=True, text=True).stdout
        got = json.loads(out)
        print(f"round {r}: {args.mb} MB first fill {1000 * got['first_s']:.1f} ms "
              f"({1000 * got['first_s'] / args.mb:.2f} ms/MB), again "
              f"{1000 * got['again_s']:.1f} ms ({1000 * got['again_s'] / args.mb:.2f} ms/MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
