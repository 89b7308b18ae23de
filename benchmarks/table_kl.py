"""How the tied logits table's 4-bit rounding moves the next-token distribution, offline.

Collects the logits MatMul's input rows (the decoder's final LayerNorm output, teacher-forced
on the FP32 model's own greedy transcripts) on the calibration clips and on the held-out set
(`benchmarks/heldout_set.py`), then rounds the table [K, V] in several ways and measures, on
the held-out rows only, the mean KL(FP32 || rounded) of the next-token distribution and how
often the arg max stays the same. No ONNX Runtime build, no WER: a cheap screen of table
roundings before building any.

Roundings: MSE-clipped round to nearest at 4/32 (zero points, float16 scales: what sfc
builds); GPTQ on the calibration Gram at several dampings; GPTQ per token with a Hessian
weighted by the FP32 model's probability of that token at each calibration row (the
second-order term of the KL, for the tokens that carry calibration mass, shrunk towards
the shared Gram by `--beta`); and the tokens with the most calibration probability mass
kept at INT8 per channel (the rest MSE 4/32); with `--ranks`, MSE 4/32 plus a rank-k
correction A B fitted on the calibration Gram (float, and A float16 / B INT8 per row); with
`--rotate`, MSE and GPTQ at 4/32 and 4/128 on the table rotated along K by signs times a
block Hadamard (`hadamard_rotation.py`), against the same without the rotation.

    SFC_CACHE=/tmp/sfccache python benchmarks/table_kl.py [--model whisper-tiny.en] \
        [--json benchmarks/results/table_kl_tiny.json]
    SFC_CACHE=/tmp/sfccache python benchmarks/table_kl.py --damps --beta --int8-tokens 3000 \
        --ranks 4 8 16 32
    SFC_CACHE=/tmp/sfccache python benchmarks/table_kl.py --damps --int8-tokens --rotate
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from common import machine_info
from hadamard_rotation import rotation
from onnx import numpy_helper

from sfc.calib.feeds import whisper_feeds
from sfc.calib.stats import collect_stats
from sfc.eval.manifest import read_manifest
from sfc.models import model_folder
from sfc.paths import cache_dir
from sfc.quant.gptq import GptqConfig, gptq_quantize
from sfc.quant.spec import QuantSpec
from sfc.quant.weights import dequantize_weight, round_to_nearest
from sfc.runtime.search import log_softmax
from sfc.runtime.whisper import WhisperRuntime

TABLE = {"whisper-tiny.en": "/MatMul_16", "whisper-base": "/MatMul_24"}
W4 = QuantSpec(4, "block", 0, 32, zero_point=True, scale_bits=16)
W8 = QuantSpec(8, "channel", 1)


class _Rows:
    """A Gram-accumulator stand-in for `collect_stats` that keeps the rows themselves."""

    def __init__(self) -> None:
        self.rows: list[np.ndarray] = []

    def update(self, x: np.ndarray) -> None:
        self.rows.append(np.asarray(x, np.float32).reshape(-1, x.shape[-1]))


def _inputs(folder: Path, table: str, manifests: list[Path]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The FP32 table [K, V] and its MatMul's input rows on each manifest's clips."""
    decoder = onnx.load(str(folder / "decoder.onnx"))
    node = next(n for n in decoder.graph.node if n.name == table)
    w = next(numpy_helper.to_array(t) for t in decoder.graph.initializer
             if t.name == node.input[1])
    runtime = WhisperRuntime.open(folder, arena=False)
    out = []
    for manifest in manifests:
        utts = read_manifest(manifest)
        rows = _Rows()
        collect_stats(str(folder / "decoder.onnx"), [], whisper_feeds(runtime, utts, "decoder", {}),
                      total=len(utts), grams={node.input[0]: rows}, progress=f"rows {manifest}")
        out.append(np.concatenate(rows.rows))
    return np.asarray(w, np.float32), out


def _low_rank(err: np.ndarray, gram: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A [K, k] and B [k, V] minimising ||X (err - A B)||_F for rows X with Gram X^T X.

    With H = X^T X = Q L Q^T, the error seen through X is H^(1/2) err; its top-k singular
    directions are the best rank-k fit there (Eckart-Young), mapped back by H^(-1/2).
    """
    lam, vec = np.linalg.eigh(gram)
    lam = np.maximum(lam, 1e-6 * lam.max())
    root = (vec * np.sqrt(lam)) @ vec.T
    inv_root = (vec / np.sqrt(lam)) @ vec.T
    u, sv, vt = np.linalg.svd(root @ err.astype(np.float64), full_matrices=False)
    return (inv_root @ (u[:, :k] * sv[:k])).astype(np.float32), vt[:k].astype(np.float32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="whisper-tiny.en", choices=sorted(TABLE))
    ap.add_argument("--calib", type=Path, default=Path("calibration_data/calib"))
    ap.add_argument("--heldout", type=Path, default=None,
                    help="held-out manifest folder (default $SFC_CACHE/heldout)")
    ap.add_argument("--damps", type=float, nargs="*", default=[0.01, 0.1, 0.3, 1.0])
    ap.add_argument("--token-mass", type=float, default=0.05,
                    help="per-token GPTQ for tokens with at least this calibration mass")
    ap.add_argument("--beta", type=float, nargs="*", default=[1.0])
    ap.add_argument("--int8-tokens", type=int, nargs="*", default=[1000, 3000, 10000])
    ap.add_argument("--ranks", type=int, nargs="*", default=[],
                    help="a rank-k correction of MSE 4/32's error, fitted on the calibration Gram")
    ap.add_argument("--rotate", action="store_true",
                    help="4/32 and 4/128, with and without a Hadamard rotation along K")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    heldout = args.heldout or cache_dir() / "heldout"
    w, (xc, xh) = _inputs(model_folder(args.model), TABLE[args.model], [args.calib, heldout])
    lp = log_softmax(xh @ w)
    p, top = np.exp(lp), lp.argmax(axis=1)
    rows: list[dict[str, Any]] = []

    def score(wq: np.ndarray, label: str, **extra: Any) -> None:
        z = xh @ wq
        kl = float((p * (lp - log_softmax(z))).sum(axis=1).mean())
        rows.append({"rounding": label, "kl": kl, "top1": float((z.argmax(axis=1) == top).mean()),
                     **extra})
        print(f"{label:44s} KL {kl:.3e}  top-1 kept {rows[-1]['top1']:.4f}", flush=True)

    q, s = round_to_nearest(w, W4, "mse")
    mse = dequantize_weight(q, W4, s)
    score(mse, "MSE 4/32")
    gram = xc.astype(np.float64).T @ xc.astype(np.float64)
    for damp in args.damps:
        q, s = gptq_quantize(w, gram, xc.shape[0], W4, GptqConfig(damp=damp))
        score(dequantize_weight(q, W4, s), f"GPTQ 4/32, damp {damp:g}")
    pc = np.exp(log_softmax(xc @ w))
    mass = pc.sum(axis=0)
    order = np.argsort(-mass, kind="stable")
    x64 = xc.astype(np.float64)
    tokens = order[mass[order] >= args.token_mass]
    for beta in args.beta:
        start, wq = time.perf_counter(), mse.copy()
        for n in tokens:
            weight = pc[:, n].astype(np.float64)
            h = (x64 * weight[:, None]).T @ x64 + beta * mass[n] / xc.shape[0] * gram
            qn, sn = gptq_quantize(w[:, [n]], h, 1, W4, GptqConfig(damp=0.01))
            wq[:, n] = dequantize_weight(qn, W4, sn)[:, 0]
        score(wq, f"per-token GPTQ ({len(tokens)} tokens), beta {beta:g}",
              seconds=round(time.perf_counter() - start, 1))
    q, s = round_to_nearest(w, W8)
    int8 = dequantize_weight(q, W8, s)
    score(int8, "INT8 per channel")
    for k in args.int8_tokens:
        wq = mse.copy()
        wq[:, order[:k]] = int8[:, order[:k]]
        score(wq, f"top {k} tokens by mass INT8, rest MSE 4/32", share=k / w.shape[1])
    for k in args.ranks:
        a, b = _low_rank(w - mse, gram, k)
        score(mse + a @ b, f"MSE 4/32 + rank {k} (float)", rank=k)
        qb, sb = round_to_nearest(b.T.astype(np.float32), W8)
        b8 = dequantize_weight(qb, W8, sb).T
        score(mse + a.astype(np.float16).astype(np.float32) @ b8,
              f"MSE 4/32 + rank {k} (A fp16, B INT8 per row)", rank=k)
    if args.rotate:
        rot = rotation(w.shape[0], np.random.default_rng(0))
        for block in (32, 128):
            spec = QuantSpec(4, "block", 0, block, zero_point=True, scale_bits=32)
            for label, r in (("", np.eye(w.shape[0])), (", rotated", rot)):
                wr = (r.T @ w).astype(np.float32)
                q, s = round_to_nearest(wr, spec, "mse")
                score(r @ dequantize_weight(q, spec, s), f"MSE 4/{block}{label}")
                q, s = gptq_quantize(wr, r.T @ gram @ r, xc.shape[0], spec, GptqConfig())
                score(r @ dequantize_weight(q, spec, s), f"GPTQ 4/{block}{label}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "machine": machine_info(0),
                                         "calib_rows": int(xc.shape[0]),
                                         "heldout_rows": int(xh.shape[0]), "rows": rows},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
