"""Time and memory of ONNX Runtime's arena choices for the build's probe and FP32 sessions.

One mode per process (ORT's shared arena is process-wide), so run each mode on its own:

    python benchmarks/segment_sessions.py gated BUILD MODE   # whole seg noarena shared sharedspin
    python benchmarks/segment_sessions.py fp32 EXPORT MODE   # noarena shared arena

`gated`: BUILD's encoder (model.qdq.onnx, recipe.json) with every quantized activation
gated as the activation guard does; "whole" is one session, the others `SegmentedSession`
with an arena per segment ("seg"), none ("noarena"), ORT's shared arena with pools that
sleep ("shared", what the build uses) or spin ("sharedspin"). Prints seconds per window for
4 random windows with every gate on, then per window for every fourth gate off in turn,
and RSS. `fp32`: an FP32 export's encoder through `WhisperRuntime`, one random window six
times. Results in BENCHMARKS.md, issue 13 (sixteenth session).
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from sfc.calib.segments import SegmentedSession
from sfc.precision.activations import gate_activations, gate_name
from sfc.quant.recipe import Recipe
from sfc.runtime.session import session_options
from sfc.runtime.whisper import WhisperRuntime

LEVEL0 = (("session.qdq_matmulnbits_accuracy_level", "0"),)  # the avx2 class's encoder


def _rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gated(build: Path, mode: str) -> None:
    recipe = Recipe.load(build / "encoder" / "recipe.json")
    model = onnx.load(str(build / "encoder" / "model.qdq.onnx"))
    quantized = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    acts = [t.tensor for t in recipe.tensors if t.kind == "activation" and t.tensor in quantized]
    graph, gates = gate_activations(model, acts), [gate_name(t) for t in acts]

    def opener(source: bytes, level: str | None, save_to: str | None,
               _shared: bool) -> ort.InferenceSession:
        arena = {"noarena": False, "shared": "shared", "sharedspin": "shared"}.get(mode, True)
        options = session_options(threads=2, optimization=level or "all", config=LEVEL0,
                                  spinning=mode in ("whole", "sharedspin"),
                                  arena=arena if save_to is None else True)
        options.log_severity_level = 3
        if save_to is not None:
            options.optimized_model_filepath = save_to
        return ort.InferenceSession(source, sess_options=options,
                                    providers=["CPUExecutionProvider"])

    if mode == "whole":
        session = opener(graph.SerializeToString(), None, None, False)

        def run(x: np.ndarray, g: dict[str, np.ndarray]) -> object:
            return session.run(None, {"input_features": x, **g})
    else:
        segmented = SegmentedSession(graph, gates, opener)

        def run(x: np.ndarray, g: dict[str, np.ndarray]) -> object:
            return segmented.run(None, {"input_features": x}, g)
    del graph
    rng = np.random.default_rng(0)
    windows = [(rng.standard_normal((1, 80, 3000)) * 0.5).astype(np.float32) for _ in range(4)]
    on = {g: np.array(1, np.float32) for g in gates}
    t = time.perf_counter()
    for x in windows:
        run(x, on)
    all_on = (time.perf_counter() - t) / len(windows)
    print(f"{mode}: {len(gates)} gates; all on {all_on:.3f} s/window, RSS {_rss_mib():.0f} MiB")
    probed = gates[::4]
    t = time.perf_counter()
    for gate in probed:
        for x in windows:
            run(x, on | {gate: np.array(0, np.float32)})
    probe = (time.perf_counter() - t) / len(windows) / len(probed)
    print(f"{mode}: {len(probed)} probes {probe:.3f} s/window, RSS {_rss_mib():.0f} MiB, "
          f"peak {_peak_mib():.0f} MiB")


def fp32(export: Path, mode: str) -> None:
    arena = {"noarena": False, "shared": "shared", "arena": True}[mode]
    runtime = WhisperRuntime.open(export, arena=arena)
    x = (np.random.default_rng(0).standard_normal((1, 80, 3000)) * 0.5).astype(np.float32)
    t = time.perf_counter()
    for _ in range(6):
        runtime.encode(x)
    print(f"{mode}: {(time.perf_counter() - t) / 6:.3f} s/window, RSS {_rss_mib():.0f} MiB, "
          f"peak {_peak_mib():.0f} MiB")


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("gated", "fp32"):
        sys.exit(__doc__)
    (gated if sys.argv[1] == "gated" else fp32)(Path(sys.argv[2]), sys.argv[3])
