"""ONNX Runtime sessions for sfc's graphs (no torch)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import SfcError

__all__ = ["OPTIMIZATION", "Arena", "open_session", "session_options", "shrink_shared_arena",
           "shrinking_run"]

# ORT's CPU arena for a session: its own (True), none (False), or "shared": ORT's one
# process-wide CPU arena, registered on first use.
Arena = bool | str
_shared_arena: list[bool] = []  # registered in this process
_shrinker: list[ort.InferenceSession] = []  # a one-node session on the shared arena

# Graph optimisation levels a model card may ask for. "basic" (constant folding, no QDQ
# fusion) keeps fake-quant graphs exact: onnxruntime 1.31's extended rewrites drop a Relu in
# front of an INT4 QuantizeLinear (tests/test_targets_sim.py).
OPTIMIZATION = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


def session_options(*, threads: int | None = None, optimization: str = "all",
                    arena: Arena = True, spinning: bool = True,
                    config: Iterable[tuple[str, str]] = ()) -> ort.SessionOptions:
    """The options every sfc session starts from.

    `optimization`: a key of `OPTIMIZATION`. `threads`: intra-op threads (None: ORT's
    default, one per core). `arena`: ORT's CPU memory arena, which keeps the largest
    footprint any run needed for the session's life; the build runs the sessions it
    keeps open but idle (its FP32 runtime) and its one-pass statistics without it, so
    their footprints do not add up under ESC's (BENCHMARKS.md, issue 13). `config`:
    session config entries (a target's `session_config`, e.g. MatMulNBits' accuracy level).
    `spinning`: ORT's worker threads spin for a while after each parallel section, waiting
    for the next; off, they sleep. Two sessions that take turns (Whisper's encoder and
    decoder, each with its own pool) should not spin: the idle pool's spinning takes the
    cores from the busy one.
    """
    if optimization not in OPTIMIZATION:
        raise SfcError(f"unknown graph optimization level {optimization!r} "
                       f"(expected one of {', '.join(OPTIMIZATION)})")
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION[optimization]
    if arena not in (True, False, "shared"):
        raise ValueError(f"arena is True, False or 'shared', not {arena!r}")
    options.enable_cpu_mem_arena = bool(arena)
    if arena == "shared":
        if not _shared_arena:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                     ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg({}))
            _shared_arena.append(True)
        options.add_session_config_entry("session.use_env_allocators", "1")
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    for key, value in config:
        options.add_session_config_entry(key, value)
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def open_session(path: Path | bytes, *, threads: int | None = None,
                 providers: list[str] | None = None,
                 optimization: str = "all", arena: Arena = True,
                 spinning: bool = True) -> ort.InferenceSession:
    """Open `path` (or a serialized graph) in ONNX Runtime; a file ORT cannot load is a
    one-line user error.

    `optimization`: a key of `OPTIMIZATION` (the model card's choice for the graph);
    `arena`, `spinning`: see `session_options`.
    """
    if not isinstance(path, bytes):
        path = Path(path)
        if not path.is_file():
            raise SfcError(f"model file not found: {path}")
    options = session_options(threads=threads, optimization=optimization, arena=arena,
                              spinning=spinning)
    try:
        return ort.InferenceSession(path if isinstance(path, bytes) else str(path),
                                    sess_options=options,
                                    providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own opaque classes; keep their first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = "a graph sfc made" if isinstance(path, bytes) else str(path)
        raise SfcError(f"ONNX Runtime cannot load {where}: {first}") from None


def shrink_shared_arena() -> None:
    """Give the free regions of ORT's shared arena back to the system.

    The arena keeps the largest footprint any run on it needed, after its sessions go idle
    or away: the build's FP32 runtime left 0.3 GB there through whisper-base's sensitivity
    probes (BENCHMARKS.md, issue 16). ORT shrinks an arena only at the end of a run that
    asks for it, so a one-node graph on the shared arena runs once with that request.
    Nothing to do before the shared arena exists."""
    if not _shared_arena:
        return
    if not _shrinker:
        from onnx import TensorProto, helper

        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "shrink", [x], [y])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                                  ir_version=9)
        _shrinker.append(ort.InferenceSession(model.SerializeToString(),
                                              session_options(threads=1, arena="shared")))
    _shrinker[0].run(None, {"x": np.zeros(1, np.float32)}, shrinking_run())


def shrinking_run() -> ort.RunOptions:
    """Run options under which ORT gives the CPU arena's free regions back after the run."""
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options
