"""The experiment that chose how sfc's W4A16/W2A16 kernel loads and dequantizes weights.

Five variants of the weight-only kernel (``kernels/triton_gemm.py``), each checked against
a float64 reference before it is timed (``triton.testing.do_bench_cudagraph``, best of a
few tile configurations and K splits), next to ``torch.matmul`` in fp16, on Whisper tiny
and large-v3 MLP shapes at M = 1 and M = 1500:

- mode 0: flat per-element byte gather, 2-D scale gather, fp32 dequant, chained dot
- mode 1: flat per-element byte gather, integer dot, scale after (sfc's first version)
- mode 2: whole-byte loads + tl.join unpack, fp16 dequant, chained dot
- mode 3: whole-byte loads, integer dot, scale after
- mode 4: whole-byte loads, fp32 dequant to fp16, chained dot (what sfc now runs)

Run once on an H200 (``PYTHONUNBUFFERED=1 python3 benchmarks/kernel_variants.py``; log in
benchmarks/results/kernel_variants_h200.log). ``TRITON_INTERPRET=1`` checks every variant on
tiny shapes on the CPU without timing. Kept to reproduce that table, not used by sfc.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check

gpu_check.import_sfc()
from sfc.kernels.packing import pack  # noqa: E402

Tiles = tuple[int, int, int]  # BLOCK_M, BLOCK_N, BLOCK_K
Config = tuple[Tiles, int, int, int]  # tiles, K split, pipeline stages, warps
Shape = tuple[int, int, int]  # M, K, N

QBLOCK = 32  # scale block along K
MODES = range(5)
BITS = (4, 2)
SHAPES: list[Shape] = [
    (1, 384, 1536), (1, 1536, 384), (1, 1280, 5120), (1, 5120, 1280),
    (1500, 384, 1536), (1500, 1536, 384), (1500, 1280, 5120), (1500, 5120, 1280)]
INTERP_SHAPES: list[Shape] = [(1, 64, 64), (17, 64, 128)]
DECODE_BLOCK_N = (32, 64)
DECODE_SPLITS = (1, 8, 16)
PREFILL_TILES = ((64, 64, 4), (128, 64, 4), (64, 128, 4), (128, 128, 8), (128, 256, 8))
INTERP_CONFIGS: list[Config] = [((16, 32, 32), 1, 3, 4), ((16, 32, 32), 2, 3, 4)]
MAX_REL_ERR = 2e-3
BENCH_REP_MS = 20


@triton.jit
def kvar(x_ptr, w_ptr, s_ptr, M, N, K, stride_xm, stride_sk, stride_ym, y_ptr,
         BITS: tl.constexpr, QBLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
         BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, MODE: tl.constexpr):
    # MODE 0: flat gather, dequant fp32 -> fp16, chained dot (sfc now)
    # MODE 1: flat gather, integer dot, scale after (sfc before)
    # MODE 2: aligned vector bytes, dequant fp16*fp16, chained dot
    # MODE 3: aligned vector bytes, integer dot, scale after
    # MODE 4: aligned vector bytes, dequant fp32 -> fp16, chained dot
    PER_BYTE: tl.constexpr = 8 // BITS
    FIELD: tl.constexpr = (1 << BITS) - 1
    SIGN: tl.constexpr = 1 << (BITS - 1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_nb = tl.program_id(1) * (BLOCK_N // PER_BYTE) + tl.arange(0, BLOCK_N // PER_BYTE)
    NB = N // PER_BYTE
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(tl.program_id(2) * BLOCK_K, K, SPLIT_K * BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if MODE < 2:
            flat = offs_k[:, None] * N + offs_n[None, :]
            byte = tl.load(w_ptr + flat // PER_BYTE, mask=mask_k[:, None] & mask_n[None, :],
                           other=0).to(tl.int32)
            field = (byte >> ((flat % PER_BYTE) * BITS)) & FIELD
            q = (field ^ SIGN) - SIGN
        else:
            b = tl.load(w_ptr + offs_k[:, None] * NB + offs_nb[None, :],
                        mask=mask_k[:, None] & (offs_nb < NB)[None, :], other=0).to(tl.int32)
            if BITS == 4:
                lo = ((b & 15) ^ 8) - 8
                hi = (((b >> 4) & 15) ^ 8) - 8
                q = tl.reshape(tl.join(lo, hi), (BLOCK_K, BLOCK_N))
            else:
                f0 = ((b & 3) ^ 2) - 2
                f1 = (((b >> 2) & 3) ^ 2) - 2
                f2 = (((b >> 4) & 3) ^ 2) - 2
                f3 = (((b >> 6) & 3) ^ 2) - 2
                q = tl.reshape(tl.join(tl.join(f0, f2), tl.join(f1, f3)), (BLOCK_K, BLOCK_N))
        if MODE == 0:
            s = tl.load(s_ptr + (offs_k // QBLOCK)[:, None] * stride_sk + offs_n[None, :],
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(x, (q.to(tl.float32) * s).to(tl.float16), acc)
        elif MODE == 1 or MODE == 3:
            s = tl.load(s_ptr + (k0 // QBLOCK) * stride_sk + offs_n, mask=mask_n, other=0.0)
            acc += tl.dot(x, q.to(tl.float16), out_dtype=tl.float32) * s[None, :]
        elif MODE == 2:
            s = tl.load(s_ptr + (k0 // QBLOCK) * stride_sk + offs_n, mask=mask_n,
                        other=0.0).to(tl.float16)
            acc = tl.dot(x, q.to(tl.float16) * s[None, :], acc)
        else:
            s = tl.load(s_ptr + (k0 // QBLOCK) * stride_sk + offs_n, mask=mask_n, other=0.0)
            acc = tl.dot(x, (q.to(tl.float32) * s[None, :]).to(tl.float16), acc)
    if SPLIT_K > 1:
        y_ptr += tl.program_id(2) * M * stride_ym
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def launch(mode: int, bits: int, x: torch.Tensor, packed: torch.Tensor, s: torch.Tensor,
           K: int, N: int, tiles: Tiles, split: int, stages: int, warps: int) -> torch.Tensor:
    """y = x @ dequant(packed, s) in fp16 with variant `mode`; K splits summed on the host."""
    M = x.shape[0]
    bm, bn, bk = tiles
    if split == 1:
        dest = torch.empty((M, N), dtype=torch.float16, device=x.device)
    else:
        dest = torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn), split)
    kvar[grid](x, packed, s, M, N, K, x.stride(0), s.stride(0), N, dest, BITS=bits, QBLOCK=QBLOCK,
               BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, MODE=mode,
               num_warps=warps, num_stages=stages)
    return dest if split == 1 else dest.sum(0).half()


def configs(M: int, interp: bool) -> list[Config]:
    """The tile / K-split / stages / warps configurations tried for every variant."""
    if interp:
        return list(INTERP_CONFIGS)
    if M == 1:
        return [((16, bn, 32), sp, 3, 4) for bn in DECODE_BLOCK_N for sp in DECODE_SPLITS]
    return [((bm, bn, 32), 1, st, w) for bm, bn, w in PREFILL_TILES for st in (3,)]


def best_time(mode: int, bits: int, shape: Shape, inputs: tuple[torch.Tensor, ...],
              ref: np.ndarray, cfgs: list[Config], interp: bool) -> tuple[float, Config] | None:
    """The fastest correct configuration of variant `mode` (ms, config); None when none was
    timed. A wrong result prints BAD, an exception ERR; under the interpreter nothing is
    timed."""
    M, K, N = shape
    tx, tp, ts = inputs
    best: tuple[float, Config] | None = None
    for cfg in cfgs:
        tiles, split, st, w = cfg
        if split > 1 and split > K // QBLOCK:
            continue
        try:
            f = functools.partial(launch, mode, bits, tx, tp, ts, K, N, tiles, split, st, w)
            y = f().float().cpu().numpy()
            err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
            if not err < MAX_REL_ERR:
                print("BAD", M, K, N, bits, mode, tiles, split, err, flush=True)
                continue
            if interp:
                continue
            ms = triton.testing.do_bench_cudagraph(f, rep=BENCH_REP_MS)
        except Exception as e:
            print("ERR", M, K, N, bits, mode, tiles, split, type(e).__name__, str(e)[:200],
                  flush=True)
            continue
        if best is None or ms < best[0]:
            best = (ms, cfg)
    return best


def time_torch(tx: torch.Tensor, w16: torch.Tensor) -> float:
    """Milliseconds of torch's fp16 tx @ w16."""

    def matmul() -> torch.Tensor:
        return tx @ w16

    ms: float = triton.testing.do_bench_cudagraph(matmul, rep=BENCH_REP_MS)
    return ms


def run_shape(rng: np.random.Generator, shape: Shape, bits: int, dev: str, interp: bool,
              res: list[dict[str, Any]]) -> None:
    """Check and time every variant (and, on a GPU, torch fp16) at one shape and bit width;
    print a line and append a record to `res` per result."""
    M, K, N = shape
    q = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), (K, N)).astype(np.int8)
    scale = rng.uniform(0.5, 1.5, (K // QBLOCK, N)) / (1 << (bits - 1)) / np.sqrt(K)
    s = scale.astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float16)
    ref = x.astype(np.float64) @ (q * np.repeat(s, QBLOCK, 0)).astype(np.float64)
    inputs = tuple(torch.from_numpy(a).to(dev) for a in (x, pack(q, bits), s))
    cfgs = configs(M, interp)
    for mode in MODES:
        best = best_time(mode, bits, shape, inputs, ref, cfgs, interp)
        if best is not None:
            ms, cfg = best
            us = ms * 1e3
            tf = 2 * M * N * K / ms / 1e9
            print(f"M={M} K={K} N={N} W{bits} mode {mode}: {us:.1f} us {tf:.1f} TFLOP/s {cfg}",
                  flush=True)
            res.append(dict(M=M, K=K, N=N, bits=bits, mode=mode, us=us, tflops=tf, cfg=cfg))
    if not interp:
        w16 = torch.from_numpy((q * np.repeat(s, QBLOCK, 0)).astype(np.float16)).to(dev)
        ms = time_torch(inputs[0], w16)
        print(f"M={M} K={K} N={N} fp16 torch: {ms*1e3:.1f} us {2*M*N*K/ms/1e9:.1f} TFLOP/s",
              flush=True)
        res.append(dict(M=M, K=K, N=N, bits=16, mode=-1, us=ms * 1e3))


def main() -> None:
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    dev = "cpu" if interp else "cuda"
    rng = np.random.default_rng(0)
    shapes = INTERP_SHAPES if interp else SHAPES
    res: list[dict[str, Any]] = []
    for shape, bits in itertools.product(shapes, BITS):
        run_shape(rng, shape, bits, dev, interp, res)
    out = os.environ.get("OUT", "/tmp")
    Path(out, "kvariants.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
