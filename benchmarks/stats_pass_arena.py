"""Seconds per feed and peak RSS of the build's statistics pass with its session's arena
off (what the build uses), its own, or ORT's shared one.

One mode per process (ORT's shared arena is process-wide), so run each on its own:

    python benchmarks/stats_pass_arena.py EXPORT GRAPH MODE N   # MODE: off own shared

EXPORT is an exported Whisper folder, GRAPH encoder or decoder, N the number of calibration
utterances (the first N of the bundled calibration set, fed as the build feeds them, the
FP32 runtime on the shared arena as in the build). Prints seconds per feed of
`collect_stats` alone, the process's peak RSS and a digest of the statistics (equal
digests: the same histograms and absmax). Results in BENCHMARKS.md, issue 13 (seventeenth
session).
"""

from __future__ import annotations

import hashlib
import resource
import sys
import time
from pathlib import Path

import onnx

from sfc.build import BuildConfig, _fp32_runtime, target_caps
from sfc.calib import stats
from sfc.calib.feeds import whisper_feeds
from sfc.eval.manifest import read_manifest
from sfc.quant.plan import make_plan
from sfc.runtime import session

ARENAS = {"off": False, "own": True, "shared": "shared"}


def main() -> None:
    folder, graph, mode, n = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    options = session.session_options
    stats.session_options = lambda **kw: options(**{**kw, "arena": ARENAS[mode]})
    config = BuildConfig()
    model = onnx.load(str(folder / f"{graph}.onnx"))
    plan = make_plan(model, config.plan_config(graph), target_caps(config.target))
    runtime = _fp32_runtime(folder)
    feeds = list(whisper_feeds(runtime, read_manifest(config.calib)[:n], graph, {}))
    del runtime
    start = time.perf_counter()
    snapshots = stats.collect_stats(model, [q.tensor for q in plan.activations], feeds,
                                    progress=None)
    seconds = (time.perf_counter() - start) / n
    digest = hashlib.sha256(b"".join(s.hist.tobytes() + str(s.absmax).encode()
                                     for s in snapshots.values())).hexdigest()[:16]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{graph} arena={mode} {seconds:.3f} s/feed peak {peak:.0f} MiB stats {digest}")


if __name__ == "__main__":
    main()
