"""sfc's Triton GEMM kernels (W4A16, W2A16, W8A8) against torch fp16 matmul and torch._int_mm.

Run from the repository root on a machine with a CUDA GPU::

    python benchmarks/gpu_kernels.py               # -> benchmarks/results/gpu_kernels.json
    python benchmarks/gpu_kernels.py --interpret   # CPU smoke test, no GPU (see below)

Without CUDA (and without ``--interpret``) it prints one line and exits with status 2.

Correctness comes first: every kernel and every tile configuration that is timed is first
run on fresh random inputs (the seed is printed and saved) into an output buffer poisoned
with NaN (int32 outputs: with INT32_MIN), and compared with the float64 numpy reference
(``sfc.kernels.reference``): relative Frobenius error <= 1e-3 for float outputs, exact
equality for the int32 accumulator. Any failure stops the run before timing (exit 1; the
JSON then holds only the correctness results).

Timing: ``triton.testing.do_bench`` medians (25 ms warm-up, 100 ms of repetitions, L2
cleared between runs by do_bench) at Whisper's Linear shapes: tiny (d=384: q/k/v/out
384x384, fc1 384x1536, fc2 1536x384) and base (d=512, fc 2048), for the encoder (M = 1500
frames) and decoding (M = 1, 2, 4, 8 tokens). Per shape: torch.matmul in fp16 (the
baseline), the Triton W4A16 and W2A16 kernels (block 32 along K, fp32 scales, the best of
a few tile configurations), the Triton W8A8 kernel (fp16 output) and torch._int_mm (int8 ->
int32; it needs M > 16, so decode shapes record why it is missing). Reported: ms, achieved
TFLOP/s (2*M*N*K / time) and GB/s (bytes of inputs, weights, scales and output, each read or
written once), the speed-up over fp16, and the device's measured ceilings: memory bandwidth
from a 1 GiB device-to-device copy (read + write bytes) and fp16 / int8 matmul throughput
from 8192^3 GEMMs.

``--interpret`` runs only the correctness part on tiny shapes on the CPU under
``TRITON_INTERPRET=1`` (Triton's interpreter; no timing, no JSON) so the script itself can
be checked on machines without a GPU.
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "benchmarks" / "results" / "gpu_kernels.json"
FLOAT_TOL = 1e-3
INT32_MIN = -(2**31)
MODELS = {"tiny": 384, "base": 512}  # d_model; the MLP is 4 * d
ENCODER_M, DECODE_M = 1500, (1, 2, 4, 8)
_INT8_KINDS = ("triton-w8a8", "torch-int-mm")  # compared with the int8 matmul ceiling


@dataclass(frozen=True)
class Shape:
    """One Linear layer of a model at M rows: y[M, N] = x[M, K] @ W[K, N]."""

    model: str
    layer: str
    m: int
    k: int
    n: int


def whisper_shapes() -> list[Shape]:
    """Every (model, layer, M) the benchmark times."""
    shapes = []
    for model, d in MODELS.items():
        for layer, k, n in (("q/k/v/out", d, d), ("fc1", d, 4 * d), ("fc2", 4 * d, d)):
            for m in (ENCODER_M, *DECODE_M):
                shapes.append(Shape(model, layer, m, k, n))
    return shapes


def interpret_shapes() -> list[Shape]:
    """Tiny shapes, not multiples of the tiles, for the CPU interpreter."""
    return [Shape("tiny-test", f"{k}x{n}", m, k, n)
            for m in (1, 3, 17) for k, n in ((40, 24), (64, 36))]


def tile_candidates(m: int, block_k: int) -> list[tuple[int, int, int]]:
    """Tile configurations (BLOCK_M, BLOCK_N, BLOCK_K) tried per shape."""
    if m <= 16:
        return [(16, 32, block_k), (16, 64, block_k), (16, 128, block_k)]
    return [(64, 64, block_k), (128, 64, block_k), (64, 128, block_k), (128, 128, block_k),
            (128, 256, block_k)]


def warps(tiles: tuple[int, ...] | None) -> int:
    """Warps per program: 8 for output tiles of 128 x 128 and more, else 4."""
    return 8 if tiles and tiles[0] * tiles[1] >= 128 * 128 else 4


def lowbit_candidates(m: int, n: int, k: int, block_size: int) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K) tried for the weight-only kernels (BLOCK_K
    divides the block): each tile configuration unsplit and, where it differs, at the
    launcher's own split."""
    from sfc.kernels.triton_gemm import split_k_for

    return [(*tiles, split) for tiles in tile_candidates(m, min(64, block_size))
            for split in dict.fromkeys((1, split_k_for(m, n, k, tiles)))]


def rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """Relative Frobenius error in float64."""
    diff = np.asarray(actual, np.float64) - np.asarray(expected, np.float64)
    return float(np.linalg.norm(diff)) / max(float(np.linalg.norm(expected)), 1e-300)


class Inputs:
    """Fresh random operands for one shape, as numpy (for the reference) and torch tensors."""

    def __init__(self, shape: Shape, rng: np.random.Generator, block_size: int,
                 device: Any) -> None:
        import torch

        from sfc.kernels.packing import pack

        m, k, n = shape.m, shape.k, shape.n
        self.block_size = block_size
        self.x = rng.standard_normal((m, k)).astype(np.float16)
        blocks = -(-k // block_size)
        self.q = {bits: rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), (k, n)).astype(np.int8)
                  for bits in (4, 2)}
        self.packed = {bits: pack(q, bits) for bits, q in self.q.items()}
        # Scales that keep outputs near unit size: ~1 / (qmax * sqrt(K)).
        self.scales = {bits: (rng.uniform(0.5, 1.5, (blocks, n)) / (1 << (bits - 1))
                              / np.sqrt(k)).astype(np.float32) for bits in (4, 2)}
        self.xq = rng.integers(-128, 128, (m, k)).astype(np.int8)
        self.wq = rng.integers(-128, 128, (k, n)).astype(np.int8)
        self.x_scale = float(rng.uniform(0.01, 0.1))
        self.w_scales = rng.uniform(1e-4, 1e-3, n).astype(np.float32)

        def t(a: np.ndarray) -> Any:
            return torch.from_numpy(np.ascontiguousarray(a)).to(device)

        self.tx = t(self.x)
        self.tpacked = {bits: t(p) for bits, p in self.packed.items()}
        self.tscales = {bits: t(s) for bits, s in self.scales.items()}
        self.txq, self.twq, self.tws = t(self.xq), t(self.wq), t(self.w_scales)
        # The fp16 baseline multiplies by the dequantized INT4 weight (same math, dense).
        w4 = self.q[4].astype(np.float32) * np.repeat(self.scales[4], block_size, axis=0)[:k]
        self.tw16 = t(w4.astype(np.float16))


def bytes_moved(kind: str, s: Shape, block_size: int) -> int:
    """Bytes a kernel must read and write at least once (inputs, weights, scales, output)."""
    m, k, n = s.m, s.k, s.n
    scales = -(-k // block_size) * n * 4
    return {
        "torch-fp16": 2 * m * k + 2 * k * n + 2 * m * n,
        "triton-w4a16": 2 * m * k + -(-k * n // 2) + scales + 2 * m * n,
        "triton-w2a16": 2 * m * k + -(-k * n // 4) + scales + 2 * m * n,
        "triton-w8a8": m * k + k * n + 4 * n + 2 * m * n,
        "torch-int-mm": m * k + k * n + 4 * m * n,
    }[kind]


Run = tuple[str, tuple[int, ...] | None, Callable[[Any], Any], Any, str]


def kernel_runs(inp: Inputs, shape: Shape, device_is_cuda: bool) -> list[Run]:
    """(kind, tiles, run(out) -> result, out buffer, check) per kernel and tile configuration.

    sfc's kernels write into `out` (poisoned before each check); the torch baselines
    allocate their result (out buffer None). check: "float" (relative error against the
    reference) or "int32" (exact).
    """
    import torch

    from sfc.kernels import triton_gemm as tg

    m, k, n, bs = shape.m, shape.k, shape.n, inp.block_size
    dev = inp.tx.device
    runs: list[Run] = []

    def f16() -> Any:
        return torch.empty((m, n), dtype=torch.float16, device=dev)

    for bits, launch in ((4, tg.w4a16_gemm), (2, tg.w2a16_gemm)):
        # The interpreter runs one unsplit and one split configuration.
        configs = lowbit_candidates(m, n, k, bs) if device_is_cuda else [(16, 32, 32, 1),
                                                                      (16, 32, 32, 2)]
        for cfg in configs:
            def run(out: Any, launch: Any = launch, bits: int = bits, cfg: Any = cfg) -> Any:
                return launch(inp.tx, inp.tpacked[bits], inp.tscales[bits], k, n, bs, out=out,
                              tiles=cfg[:3], split_k=cfg[3],
                              num_warps=warps(cfg))
            runs.append((f"triton-w{bits}a16", cfg, run, f16(), "float"))
    for tiles in tile_candidates(m, 64) if device_is_cuda else [None]:
        def run8(out: Any, tiles: Any = tiles) -> Any:
            return tg.w8a8_gemm(inp.txq, inp.twq, inp.x_scale, inp.tws, out=out, tiles=tiles,
                                num_warps=warps(tiles))
        runs.append(("triton-w8a8", tiles, run8, f16(), "float"))

        def run32(out: Any, tiles: Any = tiles) -> Any:
            return tg.int8_gemm_int32(inp.txq, inp.twq, out=out, tiles=tiles,
                                      num_warps=warps(tiles))
        runs.append(("triton-int8-acc", tiles, run32,
                     torch.empty((m, n), dtype=torch.int32, device=dev), "int32"))
    if device_is_cuda:
        runs.append(("torch-fp16", None, lambda _: torch.matmul(inp.tx, inp.tw16), None,
                     "float"))
        if m > 16:  # torch._int_mm's own requirement on CUDA
            runs.append(("torch-int-mm", None, lambda _: torch._int_mm(inp.txq, inp.twq), None,
                         "int32"))
    return runs


def references(inp: Inputs, shape: Shape) -> dict[str, np.ndarray]:
    """float64-computed references (numpy) per kernel kind."""
    from sfc.kernels import reference as ref

    k, n, bs = shape.k, shape.n, inp.block_size
    acc = ref.int_gemm_int32(inp.xq, inp.wq)
    w4 = ref.w4a16_gemm(inp.x, inp.packed[4], inp.scales[4], k, n, bs)
    return {
        "triton-w4a16": w4,
        "torch-fp16": w4,
        "triton-w2a16": ref.w2a16_gemm(inp.x, inp.packed[2], inp.scales[2], k, n, bs),
        "triton-w8a8": ref.w8a8_gemm(inp.xq, inp.wq, inp.x_scale, inp.w_scales),
        "triton-int8-acc": acc,
        "torch-int-mm": acc,
    }


def check(kind: str, how: str, run: Callable[[Any], Any], out: Any,
          expected: np.ndarray) -> dict[str, Any]:
    """Run once (into a poisoned buffer when there is one) and compare with the reference."""
    import torch

    if out is not None:
        out.fill_(float("nan") if how == "float" else INT32_MIN)
    result = run(out)
    if out is not None and result is not out:
        return {"ok": False, "error": "the launcher did not write into the given buffer"}
    if result.is_cuda:
        torch.cuda.synchronize()
    got = result.float().cpu().numpy() if how == "float" else result.cpu().numpy()
    if how == "int32":
        mismatches = int((got != expected).sum())
        return {"ok": mismatches == 0, "mismatches": mismatches}
    if not np.isfinite(got).all():
        return {"ok": False, "rel_error": None, "error": "NaN/Inf in the output (unwritten?)"}
    err = rel_error(got, expected)
    ok = err <= FLOAT_TOL or kind == "torch-fp16"  # the fp16 baseline's error is recorded only
    return {"ok": ok, "rel_error": err}


def device_info() -> dict[str, Any]:
    """Name, compute capability and library versions of the CUDA device."""
    import torch
    import triton

    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}",
            "sms": props.multi_processor_count, "memory_gib": props.total_memory / 2**30,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton.__version__}


def ceilings(bench: Callable[[Callable[[], Any]], float]) -> dict[str, float]:
    """Measured memory bandwidth (GB/s) and fp16 / int8 matmul throughput (TFLOP/s, TOP/s)."""
    import torch

    n_bytes = 1 << 30
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))
    size = 8192
    a = torch.randn((size, size), dtype=torch.float16, device="cuda")
    b = torch.randn((size, size), dtype=torch.float16, device="cuda")
    fp16_ms = bench(lambda: torch.matmul(a, b))
    a8 = torch.randint(-128, 128, (size, size), dtype=torch.int8, device="cuda")
    b8 = torch.randint(-128, 128, (size, size), dtype=torch.int8, device="cuda")
    int8_ms = bench(lambda: torch._int_mm(a8, b8))
    flops = 2 * size**3
    return {"copy_gbps": 2 * n_bytes / copy_ms / 1e6, "fp16_tflops": flops / fp16_ms / 1e9,
            "int8_tops": flops / int8_ms / 1e9}


def correctness(shapes: Sequence[Shape], seed: int, block_size: int, device: Any,
                cuda: bool) -> tuple[list[dict[str, Any]], dict[Shape, Any]]:
    """Check every kernel run on every shape; also return the runs for timing."""
    rng = np.random.default_rng(seed)
    results: list[dict[str, Any]] = []
    prepared: dict[Shape, Any] = {}
    for shape in shapes:
        inp = Inputs(shape, rng, block_size, device)
        expected = references(inp, shape)
        runs = kernel_runs(inp, shape, cuda)
        for kind, tiles, run, out, how in runs:
            res = check(kind, how, run, out, expected[kind])
            results.append({**vars(shape), "kind": kind, "tiles": tiles, **res})
            if not res["ok"]:
                print(f"FAIL {kind} tiles={tiles} {shape}: {res}", flush=True)
        prepared[shape] = runs
        if not cuda:
            print(f"checked M={shape.m} K={shape.k} N={shape.n}: "
                  f"{sum(r['ok'] for r in results[-len(runs):])}/{len(runs)} ok", flush=True)
    return results, prepared


def timings(prepared: dict[Shape, Any], block_size: int,
            bench: Callable[[Callable[[], Any]], float],
            ceil: dict[str, float]) -> list[dict[str, Any]]:
    """The best time per (shape, kind) over its tile configurations, with derived rates."""
    rows: list[dict[str, Any]] = []
    for shape, runs in prepared.items():
        best: dict[str, tuple[float, Any]] = {}
        for kind, tiles, run, out, _ in runs:
            if kind == "triton-int8-acc":
                continue  # checked for exactness; the scaled W8A8 kernel is the one timed
            ms = bench(functools.partial(run, out))
            if kind not in best or ms < best[kind][0]:
                best[kind] = (ms, tiles)
        fp16_ms = best["torch-fp16"][0]
        for kind, (ms, tiles) in best.items():
            moved = bytes_moved(kind, shape, block_size)
            flops = 2 * shape.m * shape.n * shape.k
            gbps, tflops = moved / ms / 1e6, flops / ms / 1e9
            peak = ceil["int8_tops"] if kind in _INT8_KINDS else ceil["fp16_tflops"]
            rows.append({**vars(shape), "kind": kind, "tiles": tiles, "ms": ms,
                         "tflops": tflops, "gbps": gbps, "bytes": moved,
                         "speedup_vs_fp16": fp16_ms / ms,
                         "bandwidth_fraction": gbps / ceil["copy_gbps"],
                         "compute_fraction": tflops / peak})
    return rows


def show(rows: Sequence[dict[str, Any]], ceil: dict[str, float], device: dict[str, Any]) -> None:
    """Print the timing table."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import print_table

    table = [[f"{r['model']} {r['layer']}", str(r["m"]), f"{r['k']}x{r['n']}", r["kind"],
              f"{r['ms']:.4f}", f"{r['tflops']:.2f}", f"{r['gbps']:.0f}",
              f"{100 * r['bandwidth_fraction']:.0f}%", f"{r['speedup_vs_fp16']:.2f}x",
              "" if r["tiles"] is None else "x".join(map(str, r["tiles"]))] for r in rows]
    print_table(f"{device['name']} (sm_{device['capability'].replace('.', '')}): GEMM medians",
                ["layer", "M", "KxN", "kernel", "ms", "TFLOP/s", "GB/s", "of copy BW",
                 "vs fp16", "tiles"], table,
                caption=f"ceilings (measured): copy {ceil['copy_gbps']:.0f} GB/s, fp16 matmul "
                        f"{ceil['fp16_tflops']:.0f} TFLOP/s, int8 matmul "
                        f"{ceil['int8_tops']:.0f} TOP/s")


def run_interpret(seed: int, block_size: int) -> int:
    """CPU smoke test: correctness on tiny shapes under Triton's interpreter."""
    results, _ = correctness(interpret_shapes(), seed, block_size, "cpu", cuda=False)
    failed = [r for r in results if not r["ok"]]
    print(f"interpret: {len(results) - len(failed)}/{len(results)} checks passed (seed {seed}, "
          "CPU interpreter, no timing)")
    return 1 if failed else 0


def run_cuda(args: argparse.Namespace, seed: int) -> int:
    """Correctness on every shape, then timings; writes the JSON report."""
    import triton.testing

    from sfc.atomic import write_json_atomic

    def bench(fn: Callable[[], Any]) -> float:
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))

    device = device_info()
    command = shlex.join(["python", *sys.argv])
    print(f"device: {device['name']} (compute {device['capability']}, {device['sms']} SMs) | "
          f"torch {device['torch']} | CUDA {device['cuda']} | triton {device['triton']}")
    print(f"command: {command}\nseed: {seed}", flush=True)
    report: dict[str, Any] = {"command": command, "device": device, "seed": seed,
                              "block_size": args.block_size, "tolerance": FLOAT_TOL,
                              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    started = time.perf_counter()
    results, prepared = correctness(whisper_shapes(), seed, args.block_size, "cuda", cuda=True)
    report["correctness"] = results
    failed = [r for r in results if not r["ok"]]
    print(f"correctness: {len(results) - len(failed)}/{len(results)} passed "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    if failed:
        write_json_atomic(args.json, report)
        print(f"correctness failed; no timings. wrote {args.json}")
        return 1
    ceil = ceilings(bench)
    report["ceilings"] = ceil
    report["timings"] = timings(prepared, args.block_size, bench, ceil)
    show(report["timings"], ceil, device)
    write_json_atomic(args.json, report)
    print(f"wrote {args.json}")
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="result file")
    parser.add_argument("--block-size", type=int, default=32,
                        help="quantization block along K for W4A16/W2A16 (sfc's default 32)")
    parser.add_argument("--seed", type=int, default=None,
                        help="random inputs' seed (default: fresh, printed and saved)")
    parser.add_argument("--interpret", action="store_true",
                        help="CPU smoke test: correctness on tiny shapes under TRITON_INTERPRET=1")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else int(np.random.default_rng().integers(2**63))
    if args.interpret:
        # Before triton is first imported: triton.jit picks the interpreter at decoration.
        os.environ["TRITON_INTERPRET"] = "1"
        return run_interpret(seed, args.block_size)
    import torch

    if not torch.cuda.is_available():
        print("gpu_kernels: no CUDA device (torch.cuda.is_available() is False); "
              "--interpret checks correctness on the CPU", file=sys.stderr)
        return 2
    return run_cuda(args, seed)


if __name__ == "__main__":
    sys.exit(main())
