"""Is there an exact and fast INT8 layout for the attention matmuls on this CPU? (issue 13)

Run from the repository root::

    python benchmarks/attention_int8_operands.py [--threads 2] [--seconds 1.5] [--json F]

Both operands of an attention matmul (QK^T, AV) are activations. ONNX Runtime rewrites s8
activations to u8 on x86 and multiplies u8 x s8; without VNNI (AVX2) its kernel adds the
two K-adjacent products of each pair in a saturating int16, so the second operand's pairs
must keep |a| + |b| <= 128 to be exact, which a weight can be rounded to
(`ort-cpu:avx2`) but a full-range activation cannot. For whisper-tiny.en's attention
shapes (6 heads x 1500 x 64 x 1500, and 6 x 1500 x 1500 x 64), this times ORT's
`MatMulInteger` with the second operand as s8 at full range, s8 limited to 7 bits
(|b| <= 63: every pair fits), and u8 with zero point 128 (ORT's u8 x u8 kernel, the
layout ORT itself gives two quantized activations on x86), against the float32
`MatMul`, and checks each integer result against the exact int64 product. Median of
repeated runs, one process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, machine_line, print_table

from sfc.runtime.session import session_options

SHAPES = ((6, 1500, 64, 1500), (6, 1500, 1500, 64))  # (heads, M, K, N): QK^T, AV


def _model(a_type: int, b_type: int, zero_points: tuple[int, int] | None) -> bytes:
    """y = a @ b (MatMulInteger with `zero_points`, or float MatMul)."""
    names = ["a", "b"]
    inits = []
    if zero_points is not None:
        inits = [helper.make_tensor("za", a_type, [], [zero_points[0]]),
                 helper.make_tensor("zb", b_type, [], [zero_points[1]])]
        names += ["za", "zb"]
    op, out = ("MatMul", TensorProto.FLOAT) if zero_points is None else (
        "MatMulInteger", TensorProto.INT32)
    graph = helper.make_graph(
        [helper.make_node(op, names, ["y"])], "mm",
        [helper.make_tensor_value_info("a", a_type, ["h", "m", "k"]),
         helper.make_tensor_value_info("b", b_type, ["h", "k", "n"])],
        [helper.make_tensor_value_info("y", out, ["h", "m", "n"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _median_s(session: ort.InferenceSession, feed: dict[str, np.ndarray], seconds: float
              ) -> tuple[float, int]:
    session.run(None, feed)  # warm-up
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t)
    return float(np.median(times)), len(times)


def run(threads: int, seconds: float) -> list[dict[str, object]]:
    """One row per (shape, layout): median time, rate, and the largest error against the
    exact product (integer layouts)."""
    rng = np.random.default_rng(0)
    options = session_options(threads=threads)
    rows: list[dict[str, object]] = []
    for heads, m, k, n in SHAPES:
        ops = 2 * heads * m * k * n
        a = rng.integers(0, 256, (heads, m, k), dtype=np.uint8)
        b8 = rng.integers(-128, 128, (heads, k, n), dtype=np.int8)
        b7 = rng.integers(-63, 64, (heads, k, n), dtype=np.int8)
        bu = (b8.astype(np.int16) + 128).astype(np.uint8)
        layouts = [("u8 x s8, full range", TensorProto.INT8, 0, b8),
                   ("u8 x s8, 7-bit second operand", TensorProto.INT8, 0, b7),
                   ("u8 x u8, zero point 128", TensorProto.UINT8, 128, bu)]
        for label, b_type, zb, b in layouts:
            session = ort.InferenceSession(_model(TensorProto.UINT8, b_type, (128, zb)),
                                           options, providers=["CPUExecutionProvider"])
            got = session.run(None, {"a": a, "b": b})[0].astype(np.int64)
            exact = np.matmul(a.astype(np.int64) - 128, b.astype(np.int64) - zb)
            median, runs = _median_s(session, {"a": a, "b": b}, seconds)
            rows.append({"shape": [heads, m, k, n], "layout": label, "median_s": median,
                         "runs": runs, "gop_s": ops / median / 1e9,
                         "max_abs_error": int(np.abs(got - exact).max())})
        fa = rng.standard_normal((heads, m, k)).astype(np.float32)
        fb = rng.standard_normal((heads, k, n)).astype(np.float32)
        session = ort.InferenceSession(_model(TensorProto.FLOAT, TensorProto.FLOAT, None),
                                       options, providers=["CPUExecutionProvider"])
        median, runs = _median_s(session, {"a": fa, "b": fb}, seconds)
        rows.append({"shape": [heads, m, k, n], "layout": "float32 MatMul",
                     "median_s": median, "runs": runs, "gop_s": ops / median / 1e9,
                     "max_abs_error": None})
    for r in rows:
        fp32 = next(x for x in rows if x["shape"] == r["shape"]
                    and x["layout"] == "float32 MatMul")
        r["x_fp32"] = float(fp32["median_s"]) / float(r["median_s"])  # type: ignore[arg-type]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--seconds", type=float, default=1.5,
                        help="timed seconds per layout and shape (default 1.5)")
    parser.add_argument("--json", type=Path, help="also write the rows and the machine here")
    args = parser.parse_args(argv)
    machine = machine_info(args.threads)
    rows = run(args.threads, args.seconds)
    print_table("Attention matmuls in ORT's integer kernels",
                ["heads x M x K x N", "layout", "median ms", "G(FL)OP/s", "x FP32",
                 "max |error|"],
                [["x".join(map(str, r["shape"])), str(r["layout"]),  # type: ignore[call-overload]
                  f"{float(r['median_s']) * 1e3:.2f}",  # type: ignore[arg-type]
                  f"{float(r['gop_s']):.1f}", f"{float(r['x_fp32']):.2f}",  # type: ignore[arg-type]
                  "-" if r["max_abs_error"] is None else str(r["max_abs_error"])]
                 for r in rows],
                "error: largest |integer result - exact int64 product|; 0 = exact")
    print(machine_line(machine))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "threads": args.threads,
                                         "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
